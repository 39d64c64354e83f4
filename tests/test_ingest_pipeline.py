"""The ingest pipeline on real SQLite files and real Ed25519: every bad input is rejected with its reason code,
changes nothing in the ledger, and the next good report is still accepted."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from mqtt_fixtures import contribution_report

from coordinator.ingest.pipeline import InboundMessage, IngestPipeline, Outcome, Verdict
from coordinator.ledger.dedup import DedupIndex
from coordinator.ledger.store import LedgerStore
from coordinator.mid_key import mid_key_name
from coordinator.registry.store import Registry
from edge.agent.ledger_view import LedgerView
from protocol.errors import Reason
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind
from protocol.messages import DeviceStatus, EnrolmentRequest, Heartbeat, ReceiptBatch
from protocol.topics import UpKind, up_topic

MID = "riverside"
NOW_MS = 1_790_000_000_000


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Fixture:
    def __init__(self, root: Path, burst: int = 1000) -> None:
        self.mid_key = SignerKey.generate(mid_key_name(MID))
        self.registry = Registry(root / "registry.sqlite")
        self.ledger = LedgerStore.open(root / "ledger.sqlite", self.mid_key)
        self.dedup = DedupIndex(root / "ingest.sqlite")
        self.clock = Clock()
        self.keys: dict[str, SignerKey] = {}
        for device in ("dev-a", "dev-b", "dev-c"):
            self.enrol(device)
        self.pipeline = IngestPipeline(
            MID, self.registry, self.ledger, self.dedup, self.mid_key, 64 * 1024, 10.0, burst, clock=self.clock
        )

    def enrol(self, device: str) -> SignerKey:
        key = SignerKey.generate(device)
        invite = f"inv-{device}"
        self.registry.add_invite(invite, f"member-{device}", NOW_MS, NOW_MS + 10_000)
        self.registry.redeem_invite(invite, NOW_MS, device, key.verifier, "$7$101$x$y")
        self.keys[device] = key
        return key

    def report(self, device: str, seq: int, i: int | None = None, key: SignerKey | None = None) -> bytes:
        return contribution_report(seq if i is None else i, device, seq, NOW_MS).seal(key or self.keys[device])

    def run(self, topic: str, payload: bytes) -> list[Verdict]:
        screened = self.pipeline.screen([InboundMessage(topic, payload)], NOW_MS)
        return screened.settled + self.pipeline.commit(screened.candidates, NOW_MS)

    def one(self, topic: str, payload: bytes) -> Verdict:
        (verdict,) = self.run(topic, payload)
        return verdict


def topic(device: str, kind: UpKind = UpKind.REPORT) -> str:
    return up_topic(MID, device, kind)


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


def test_good_report_is_logged_and_its_receipt_verifies_on_the_device(fx: Fixture) -> None:
    envelope = fx.report("dev-a", 1)
    verdict = fx.one(topic("dev-a"), envelope)
    assert verdict.outcome is Outcome.ACCEPTED and verdict.leaf_index == 0
    assert fx.ledger.size == 1
    ((receipt_topic, payload),) = fx.pipeline.receipt_batches([verdict], NOW_MS)
    assert receipt_topic == f"mid/{MID}/dev/dev-a/down/receipt"
    view = LedgerView(fx.mid_key.verifier, fx.keys["dev-a"].key_id.hex(), lambda a, b: [], None)
    outcome = view.settle_batch(ReceiptBatch.parse(payload), {1: (LeafKind.CONTRIBUTION, envelope)}.get)
    assert [(r.seq, r.leaf_index, r.tree_size) for r in outcome.settled] == [(1, 0, 1)] and not outcome.refused


def test_one_receipt_batch_per_device_covers_all_its_reports_of_a_ledger_batch(fx: Fixture) -> None:
    envelopes = {(d, seq): fx.report(d, seq) for d in ("dev-a", "dev-b") for seq in range(1, 6)}
    messages = [InboundMessage(topic(d), env) for (d, _), env in envelopes.items()]
    screened = fx.pipeline.screen(messages, NOW_MS)
    committed = fx.pipeline.commit(screened.candidates, NOW_MS)
    batches = dict(fx.pipeline.receipt_batches(committed, NOW_MS))
    assert sorted(batches) == [f"mid/{MID}/dev/dev-a/down/receipt", f"mid/{MID}/dev/dev-b/down/receipt"]
    for device in ("dev-a", "dev-b"):
        batch = ReceiptBatch.parse(batches[f"mid/{MID}/dev/{device}/down/receipt"])
        held = {seq: (LeafKind.CONTRIBUTION, envelopes[(device, seq)]) for seq in range(1, 6)}
        view = LedgerView(fx.mid_key.verifier, fx.keys[device].key_id.hex(), lambda a, b: [], None)
        outcome = view.settle_batch(batch, held.get)
        assert sorted(r.seq for r in outcome.settled) == [1, 2, 3, 4, 5] and not outcome.refused
        # Another device's bytes do not verify under this device's paths.
        other = "dev-b" if device == "dev-a" else "dev-a"
        wrong = {seq: (LeafKind.CONTRIBUTION, envelopes[(other, seq)]) for seq in range(1, 6)}
        refused = view.settle_batch(batch, wrong.get)
        assert not refused.settled and len(refused.refused) == 5


def _rejects(fx: Fixture, topic_name: str, payload: bytes, reason: Reason) -> None:
    before = fx.ledger.size
    verdict = fx.one(topic_name, payload)
    assert verdict.outcome is Outcome.REJECTED, verdict
    assert verdict.reason is reason, verdict.error
    assert fx.ledger.size == before
    # ... and the service keeps serving the others.
    good = fx.one(topic("dev-c"), fx.report("dev-c", fx.ledger.size + 100))
    assert good.outcome is Outcome.ACCEPTED


def test_forged_signature(fx: Fixture) -> None:
    doc = json.loads(fx.report("dev-a", 1))
    sig = bytearray(base64.b64decode(doc["signatures"][0]["sig"]))
    sig[5] ^= 0x01
    doc["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    _rejects(fx, topic("dev-a"), json.dumps(doc).encode(), Reason.BAD_SIGNATURE)


def test_payload_swapped_under_a_valid_signature(fx: Fixture) -> None:
    doc = json.loads(fx.report("dev-a", 1))
    doc["payload"] = json.loads(fx.report("dev-a", 2))["payload"]
    _rejects(fx, topic("dev-a"), json.dumps(doc).encode(), Reason.BAD_SIGNATURE)


def test_unknown_key(fx: Fixture) -> None:
    stranger = SignerKey.generate("dev-a")
    _rejects(fx, topic("dev-a"), fx.report("dev-a", 1, key=stranger), Reason.UNKNOWN_KEY)


def test_revoked_key(fx: Fixture) -> None:
    assert fx.one(topic("dev-b"), fx.report("dev-b", 1)).outcome is Outcome.ACCEPTED
    assert fx.registry.revoke("dev-b", NOW_MS + 1)
    fx.pipeline.refresh_registry()  # picks up the revocation and logs it as a key-revoke leaf
    assert fx.ledger.size == 2 and fx.registry.logged_index("dev-b", "revoke") == 1
    _rejects(fx, topic("dev-b"), fx.report("dev-b", 2), Reason.REVOKED_KEY)


def test_replayed_seq_same_bytes_resends_the_receipt_and_logs_nothing(fx: Fixture) -> None:
    envelope = fx.report("dev-a", 7)
    first = fx.one(topic("dev-a"), envelope)
    assert first.outcome is Outcome.ACCEPTED
    again = fx.one(topic("dev-a"), envelope)
    assert (again.outcome, again.reason, again.leaf_index) == (Outcome.DUPLICATE, Reason.REPLAYED, first.leaf_index)
    ((_, payload),) = fx.pipeline.receipt_batches([again], NOW_MS)
    view = LedgerView(fx.mid_key.verifier, fx.keys["dev-a"].key_id.hex(), lambda a, b: [], None)
    outcome = view.settle_batch(ReceiptBatch.parse(payload), {7: (LeafKind.CONTRIBUTION, envelope)}.get)
    assert [r.leaf_index for r in outcome.settled] == [first.leaf_index]
    assert fx.ledger.size == 1


def test_same_seq_different_bytes_is_equivocation_with_evidence(fx: Fixture) -> None:
    assert fx.one(topic("dev-a"), fx.report("dev-a", 7, i=1)).outcome is Outcome.ACCEPTED
    _rejects(fx, topic("dev-a"), fx.report("dev-a", 7, i=2), Reason.EQUIVOCATION)
    assert fx.dedup.equivocation_count() == 1


def test_duplicate_within_one_batch_is_logged_once(fx: Fixture) -> None:
    envelope = fx.report("dev-a", 3)
    screened = fx.pipeline.screen([InboundMessage(topic("dev-a"), envelope)] * 3, NOW_MS)
    committed = fx.pipeline.commit(screened.candidates, NOW_MS)
    assert [v.outcome for v in committed] == [Outcome.ACCEPTED]
    assert [v.outcome for v in screened.settled] == [Outcome.DUPLICATE, Outcome.DUPLICATE]
    assert fx.ledger.size == 1


def test_report_on_another_devices_topic(fx: Fixture) -> None:
    _rejects(fx, topic("dev-b"), fx.report("dev-a", 1), Reason.TOPIC_MISMATCH)


def test_oversized_payload(fx: Fixture) -> None:
    _rejects(fx, topic("dev-a"), b"{" + b" " * (64 * 1024) + b"}", Reason.TOO_LARGE)


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"{}",
        b'{"payloadType": 1}',
        b"\xff\xfe",
        b"[]",
        b'{"payloadType":"x","payload":"","signatures":[]}',
    ],
)
def test_malformed_json(fx: Fixture, payload: bytes) -> None:
    _rejects(fx, topic("dev-a"), payload, Reason.MALFORMED)


def test_report_body_that_breaks_the_schema_is_malformed(fx: Fixture) -> None:
    from protocol.envelope import seal
    from protocol.messages import ContributionReport

    body = json.dumps({"v": 1, "seq": "1", "surprise": True}).encode()
    _rejects(fx, topic("dev-a"), seal(ContributionReport.PAYLOAD_TYPE, body, fx.keys["dev-a"]), Reason.MALFORMED)


def test_wrong_payload_type(fx: Fixture) -> None:
    heartbeat = Heartbeat(seq=1, device_time_ms=NOW_MS, status=DeviceStatus.IDLE).seal(fx.keys["dev-a"])
    _rejects(fx, topic("dev-a"), heartbeat, Reason.WRONG_TYPE)


def test_a_report_under_the_retired_v1_payload_type_is_the_wrong_type(fx: Fixture) -> None:
    from protocol.envelope import seal

    report = contribution_report(1, "dev-a", 1, NOW_MS)
    v1 = "application/vnd.midgate.contribution-report.v1+json"
    _rejects(fx, topic("dev-a"), seal(v1, report.canonical_json(), fx.keys["dev-a"]), Reason.WRONG_TYPE)


@pytest.mark.parametrize("name", ["mid/other/dev/dev-a/up/report", "mid/riverside/dev/dev-a/down/receipt", "x/y"])
def test_bad_topic(fx: Fixture, name: str) -> None:
    _rejects(fx, name, fx.report("dev-a", 1), Reason.BAD_TOPIC)


def test_flood_beyond_rate_limit_is_refused_then_recovers(tmp_path: Path) -> None:
    fx = Fixture(tmp_path, burst=20)
    verdicts = [fx.one(topic("dev-a"), fx.report("dev-a", seq)) for seq in range(1, 51)]
    accepted = [v for v in verdicts if v.outcome is Outcome.ACCEPTED]
    limited = [v for v in verdicts if v.reason is Reason.RATE_LIMITED]
    assert (len(accepted), len(limited)) == (20, 30)
    assert fx.ledger.size == 20
    assert fx.one(topic("dev-b"), fx.report("dev-b", 1)).outcome is Outcome.ACCEPTED
    fx.clock.t += 1.0  # 10 tokens/s refill
    later = [fx.one(topic("dev-a"), fx.report("dev-a", seq)) for seq in range(51, 63)]
    assert [v.outcome for v in later].count(Outcome.ACCEPTED) == 10


def test_heartbeats_are_verified_not_logged_and_replays_refused(fx: Fixture) -> None:
    beat = Heartbeat(seq=5, device_time_ms=NOW_MS, status=DeviceStatus.IDLE).seal(fx.keys["dev-a"])
    assert fx.one(topic("dev-a", UpKind.HEARTBEAT), beat).outcome is Outcome.HEARTBEAT
    assert fx.one(topic("dev-a", UpKind.HEARTBEAT), beat).reason is Reason.REPLAYED
    will = Heartbeat(seq=2, device_time_ms=NOW_MS, status=DeviceStatus.OFFLINE).seal(fx.keys["dev-a"])
    assert fx.one(topic("dev-a", UpKind.HEARTBEAT), will).outcome is Outcome.HEARTBEAT
    assert fx.ledger.size == 0


def test_dedup_index_catches_up_after_a_crash_between_ledger_and_index(tmp_path: Path) -> None:
    fx = Fixture(tmp_path)
    envelope = fx.report("dev-a", 9)
    screened = fx.pipeline.screen([InboundMessage(topic("dev-a"), envelope)], NOW_MS)
    # The ledger commits, then the process dies before the dedup index does.
    fx.ledger.append_leaves([c.leaf for c in screened.candidates])
    assert fx.dedup.indexed_size == 0
    restarted = IngestPipeline(MID, fx.registry, fx.ledger, fx.dedup, fx.mid_key, 64 * 1024, 10.0, 100)
    verdict = restarted.screen([InboundMessage(topic("dev-a"), envelope)], NOW_MS).settled[0]
    assert verdict.outcome is Outcome.DUPLICATE and verdict.leaf_index == 0
    assert fx.ledger.size == 1


def test_equivocation_within_one_batch_is_refused_with_evidence(fx: Fixture) -> None:
    first, second = fx.report("dev-a", 4, i=1), fx.report("dev-a", 4, i=2)
    screened = fx.pipeline.screen(
        [InboundMessage(topic("dev-a"), first), InboundMessage(topic("dev-a"), second)], NOW_MS
    )
    committed = fx.pipeline.commit(screened.candidates, NOW_MS)
    assert [v.outcome for v in committed] == [Outcome.ACCEPTED]
    assert [v.reason for v in screened.settled] == [Reason.EQUIVOCATION]
    assert fx.ledger.size == 1 and fx.dedup.equivocation_count() == 1


def test_dedup_high_water_mark_still_catches_out_of_order_resends_after_restart(fx: Fixture, tmp_path: Path) -> None:
    envelopes = {seq: fx.report("dev-a", seq) for seq in (5, 3, 9)}
    for env in envelopes.values():
        assert fx.one(topic("dev-a"), env).outcome is Outcome.ACCEPTED
    assert fx.one(topic("dev-a"), envelopes[3]).outcome is Outcome.DUPLICATE
    fx.dedup.close()
    reopened = DedupIndex(tmp_path / "ingest.sqlite")
    restarted = IngestPipeline(MID, fx.registry, fx.ledger, reopened, fx.mid_key, 64 * 1024, 10.0, 1000)
    for seq, env in envelopes.items():
        verdict = restarted.screen([InboundMessage(topic("dev-a"), env)], NOW_MS).settled[0]
        assert (verdict.outcome, verdict.seq) == (Outcome.DUPLICATE, seq)
    assert fx.ledger.size == 3


def _enrolment_request(fx: Fixture, device: str, seq: int) -> bytes:
    return EnrolmentRequest(
        mid=MID,
        device=device,
        device_key=fx.keys[device].verifier.text(),
        invite_token="i" * 22,
        seq=seq,
        device_time_ms=NOW_MS,
    ).seal(fx.keys[device])


def test_one_key_seq_names_one_statement_across_every_kind_the_key_signs(fx: Fixture) -> None:
    """docs/protocol.md "Replay rules": a report reusing the seq of the device's logged enrolment request (appended by
    another of serve's writers, the enrolment endpoint) or a heartbeat reusing a logged report's seq is
    `equivocation`; reports resent out of order are still taken."""
    fx.ledger.append_leaves([Leaf(LeafKind.ENROL, _enrolment_request(fx, "dev-a", 0))])
    assert fx.one(topic("dev-a"), fx.report("dev-a", 5)).outcome is Outcome.ACCEPTED
    assert fx.dedup.lookup(fx.keys["dev-a"].key_id.hex(), 0) is not None  # the enrolment was indexed on the way
    _rejects(fx, topic("dev-a"), fx.report("dev-a", 0), Reason.EQUIVOCATION)
    assert fx.one(topic("dev-a"), fx.report("dev-a", 2)).outcome is Outcome.ACCEPTED  # an older seq, resent late
    beat = Heartbeat(seq=5, device_time_ms=NOW_MS, status=DeviceStatus.IDLE).seal(fx.keys["dev-a"])
    _rejects(fx, topic("dev-a", UpKind.HEARTBEAT), beat, Reason.EQUIVOCATION)
    later = Heartbeat(seq=6, device_time_ms=NOW_MS, status=DeviceStatus.IDLE).seal(fx.keys["dev-a"])
    assert fx.one(topic("dev-a", UpKind.HEARTBEAT), later).outcome is Outcome.HEARTBEAT
    assert fx.ledger.size == 5  # the enrolment, dev-a's reports 5 and 2, and the report of dev-c each _rejects adds


def test_dedup_catch_up_indexes_every_device_signed_kind(tmp_path: Path) -> None:
    """A crash between the ledger commit and the index commit is repaired for enrolment requests and strike votes
    too, not only reports: the index follows every leaf a device key signed."""
    fx = Fixture(tmp_path)
    fx.ledger.append_leaves(
        [Leaf(LeafKind.ENROL, _enrolment_request(fx, "dev-b", 0)), Leaf(LeafKind.CONTRIBUTION, fx.report("dev-b", 4))]
    )
    fresh = DedupIndex(tmp_path / "fresh.sqlite")
    assert fresh.catch_up(fx.ledger.leaves(0, fx.ledger.size), fx.ledger.size) == 2
    key_id = fx.keys["dev-b"].key_id.hex()
    assert fresh.lookup(key_id, 0) is not None and fresh.lookup(key_id, 4) is not None
