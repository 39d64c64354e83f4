"""The contribution gate (coordinator/gate/gate.py) on real SQLite files, a real CaptureDirectory and real
Ed25519: a report is logged only for the update Flower delivered from the signer's node; it waits durably for its
round's capture, survives a restart while waiting, and is refused (and its device flagged) when the capture
contradicts it; the device's outbox settles the MID-signed Refusal. A report must also carry the nonce of its device's
invitation to the run's job, as `job start` recorded it (`wrong_round_nonce` otherwise)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path

import numpy as np
import pytest
from mqtt_fixtures import contribution_report, write_job_record

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, DropReason, NodeDrop, RoundCapture
from coordinator.federation.job_start import JobBook
from coordinator.gate import issued_nonces
from coordinator.gate.gate import Admission, ContributionGate, open_contribution_gate
from coordinator.gate.issued_nonces import RACY_NS, IssuedNonces
from coordinator.ingest.pipeline import InboundMessage, IngestPipeline, Outcome, Verdict
from coordinator.ledger.dedup import DedupIndex
from coordinator.ledger.store import LedgerStore
from coordinator.mid_key import mid_key_name
from coordinator.registry.store import Registry
from edge.agent.membership import Membership, MembershipRecord
from edge.agent.outbox import Outbox
from edge.agent.refusals import settle_refusal
from protocol.enrolment import BrokerCredentials
from protocol.envelope import decode, open_envelope, peek_envelope, seal
from protocol.errors import Reason
from protocol.identity import SignerKey
from protocol.leaves import LeafKind, decode_leaf
from protocol.messages import ContributionReport, Refusal, StrikeVote
from protocol.tasks.arrays import arrays_sha256
from protocol.topics import UpKind, up_topic

MID = "riverside"
NOW_MS = 1_790_000_000_000
RUN, ROUND = 77, 2
NODES = {"dev-a": 11, "dev-b": 12, "dev-c": 13}
GRACE_S = 60.0


def _arrays(node: int) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 4), float(node), np.float32), "b": np.zeros(4, np.float32)}


GLOBAL_SHA = arrays_sha256(_arrays(0))


def _drift(node: int) -> tuple[str, str]:
    """The gradient and drift-offset hashes a drift-corrected round captured for `node`."""
    return arrays_sha256(_arrays(-node)), hashlib.sha256(b"offset %d" % node).hexdigest()


class Coordinator:
    """The sequencer's state as `serve` opens it from its data folder: registry, ledger, dedup, pipeline, gate."""

    def __init__(self, root: Path, mid_key: SignerKey) -> None:
        self.root = root
        self.mid_key = mid_key
        self.registry = Registry(root / "registry.sqlite")
        self.ledger = LedgerStore.open(root / "ledger.sqlite", mid_key)
        self.dedup = DedupIndex(root / "ingest.sqlite")
        self.pipeline = IngestPipeline(
            MID, Registry(root / "registry.sqlite"), self.ledger, self.dedup, mid_key, 65536, 1e6, 10**6
        )
        self.gate: ContributionGate = open_contribution_gate(
            mid=MID,
            mid_key=mid_key,
            store_path=root / "contributions.sqlite",
            registry=self.registry,
            jobs_dir=root / "jobs",
            job_book_dir=root / "job-book",
            grace_s=GRACE_S,
            poll_s=0.001,
            in_ledger=lambda key_id, seq: self.dedup.lookup(key_id, seq) is not None,
        )

    def ingest(self, envelope: bytes, device: str, kind: UpKind = UpKind.REPORT) -> tuple[Admission, list[Verdict]]:
        """One message through screen -> gate -> commit, as `serve` runs them."""
        return self.ingest_batch([(envelope, device)], kind)

    def ingest_batch(
        self, messages: list[tuple[bytes, str]], kind: UpKind = UpKind.REPORT
    ) -> tuple[Admission, list[Verdict]]:
        """(envelope, device) pairs as one batch through screen -> gate -> commit."""
        batch = [InboundMessage(up_topic(MID, device, kind), envelope) for envelope, device in messages]
        screened = self.pipeline.screen(batch, NOW_MS)
        admission = self.gate.admit(screened.candidates, NOW_MS)
        committed = self.pipeline.commit(admission.ready, NOW_MS)
        return admission, screened.settled + committed

    def resolve(self, now_ms: int = NOW_MS) -> tuple[Admission, list[Verdict]]:
        admission = self.gate.resolve(now_ms)
        committed = self.pipeline.commit(admission.ready, now_ms)
        self.gate.logged(committed)
        return admission, committed

    def contributions_in_ledger(self) -> list[bytes]:
        leaves = [decode_leaf(data) for _, data in self.ledger.leaves(0, self.ledger.size)]
        return [leaf.signed for leaf in leaves if leaf.kind is LeafKind.CONTRIBUTION]

    def close(self) -> None:
        self.gate.close()
        self.pipeline.registry.close()
        self.dedup.close()
        self.ledger.close()
        self.registry.close()


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.mid_key = SignerKey.generate(mid_key_name(MID))
        self.keys: dict[str, SignerKey] = {}
        # The job `job start` recorded for RUN: one invitation nonce per device, in the job book ingest reads.
        self.nonces = {device: secrets.token_hex(16) for device in NODES}
        write_job_record(self.book, "job-77", RUN, {d: (NODES[d], self.nonces[d]) for d in NODES})
        registry = Registry(root / "registry.sqlite")
        for device, node in NODES.items():
            key = SignerKey.generate(device)
            registry.add_invite(f"inv-{device}", f"member-{device}", NOW_MS, NOW_MS + 10_000)
            registry.redeem_invite(f"inv-{device}", NOW_MS, device, key.verifier, "$7$101$x$y")
            registry.add_flower_node(device, node, f"ecdsa-sha2-nistp256 {device}", NOW_MS)
            self.keys[device] = key
        registry.close()
        self.coordinator = Coordinator(root, self.mid_key)

    @property
    def book(self) -> Path:
        return self.root / "job-book"

    def restart(self) -> Coordinator:
        self.coordinator.close()
        self.coordinator = Coordinator(self.root, self.mid_key)
        return self.coordinator

    def capture(self, server_round: int = ROUND, drift: bool = False, run: int = RUN) -> None:
        """What the strategy writes once the round is in: dev-a's and dev-b's updates, dev-c dropped (late); with
        `drift`, a drift-corrected round: each update also has its node's gradient and offset hashes (_drift)."""
        CaptureDirectory(self.root / "jobs" / f"run-{run}").on_round(
            RoundCapture(
                run,
                server_round,
                GLOBAL_SHA,
                tuple(
                    CapturedUpdate(
                        server_round,
                        n,
                        _arrays(n),
                        arrays_sha256(_arrays(n)),
                        GLOBAL_SHA,
                        50,
                        50,
                        {},
                        gradient=_arrays(-n) if drift else None,
                        gradient_sha256=_drift(n)[0] if drift else None,
                        drift_offset_sha256=_drift(n)[1] if drift else None,
                    )
                    for n in (11, 12)
                ),
                (NodeDrop(server_round, 13, DropReason.NO_REPLY),),
            )
        )

    def report(
        self,
        device: str,
        seq: int,
        node: int | None = None,
        update_sha256: str | None = None,
        drift: tuple[str | None, str | None] | None = None,
        nonce: str | None = None,
        run: int = RUN,
        server_round: int = ROUND,
    ) -> bytes:
        """A report signed as the agent signs it, naming `drift`'s (gradient, offset) hashes (none by default); it
        carries the device's invitation nonce of RUN's job unless `nonce` is given."""
        node = NODES[device] if node is None else node
        gradient, offset = (None, None) if drift is None else drift
        return contribution_report(
            seq,
            device,
            seq,
            NOW_MS,
            nonce=self.nonces[device] if nonce is None else nonce,
            run_id=run,
            round=server_round,
            node_id=node,
            global_model_sha256=GLOBAL_SHA,
            update_sha256=update_sha256 or arrays_sha256(_arrays(node)),
            gradient_sha256=gradient,
            drift_offset_sha256=offset,
        ).seal(self.keys[device])


@pytest.fixture
def world(tmp_path: Path) -> World:
    w = World(tmp_path)
    yield w
    w.coordinator.close()


def _refusal(world: World, notice: tuple[str, bytes]) -> Refusal:
    topic, payload = notice
    assert topic.endswith("/down/refusal")
    verifier = world.mid_key.verifier
    return decode(open_envelope(payload, {verifier.key_id.hex(): verifier}, Refusal.PAYLOAD_TYPE), Refusal)


def test_report_before_its_capture_waits_then_is_logged_once_with_a_receipt(world: World) -> None:
    c = world.coordinator
    envelope = world.report("dev-a", 1)
    admission, verdicts = c.ingest(envelope, "dev-a")
    assert [v.seq for v in admission.held] == [1] and verdicts == [] and c.ledger.size == 0
    assert c.gate.pending_count == 1
    # The device resends while it waits: still one waiting row, still nothing logged.
    admission, _ = c.ingest(envelope, "dev-a")
    assert len(admission.held) == 1 and c.gate.pending_count == 1 and c.ledger.size == 0
    assert c.resolve()[1] == []  # no capture yet: nothing happens

    world.capture()
    _, committed = c.resolve()
    assert [v.outcome for v in committed] == [Outcome.ACCEPTED] and committed[0].path is not None
    assert c.pipeline.receipt_batches(committed, NOW_MS)[0][0] == f"mid/{MID}/dev/dev-a/down/receipt"
    assert c.contributions_in_ledger() == [envelope] and c.gate.pending_count == 0
    # A resend after that is a plain duplicate answered with its receipt.
    _, verdicts = c.ingest(envelope, "dev-a")
    assert [v.outcome for v in verdicts] == [Outcome.DUPLICATE]


def test_matching_report_after_its_capture_goes_straight_to_the_ledger(world: World) -> None:
    world.capture()
    c = world.coordinator
    envelope = world.report("dev-b", 5)
    admission, verdicts = c.ingest(envelope, "dev-b")
    assert admission.held == [] and admission.refused == []
    assert [v.outcome for v in verdicts] == [Outcome.ACCEPTED]
    assert c.contributions_in_ledger() == [envelope]


def test_other_update_hash_is_refused_flagged_kept_as_evidence_and_never_logged(world: World) -> None:
    world.capture()
    c = world.coordinator
    forged = "ab" * 32
    envelope = world.report("dev-a", 3, update_sha256=forged)
    admission, verdicts = c.ingest(envelope, "dev-a")
    assert verdicts == [] and c.ledger.size == 0
    (refused,) = admission.refused
    assert refused.outcome is Outcome.REJECTED and refused.reason is Reason.UPDATE_MISMATCH
    notice = _refusal(world, admission.notices[0])
    assert notice.seq == 3 and notice.reason == "update_mismatch"
    assert notice.device_key_id == world.keys["dev-a"].key_id.hex()
    assert notice.envelope_sha256 == hashlib.sha256(envelope).hexdigest()

    (flag,) = c.gate.store.refusals(flagged_only=True)
    assert flag.device == "dev-a" and flag.flagged and flag.envelope == envelope
    assert flag.capture["update_sha256"] == arrays_sha256(_arrays(11))
    assert flag.capture["reported_update_sha256"] == forged
    assert c.gate.store.flag_counts() == {"dev-a": 1}

    # A resend (the notice was lost) is refused again from the stored row, with a fresh notice; one flag only.
    admission, _ = c.ingest(envelope, "dev-a")
    assert [v.reason for v in admission.refused] == [Reason.UPDATE_MISMATCH] and len(admission.notices) == 1
    assert len(c.gate.store.refusals()) == 1 and c.ledger.size == 0


def test_waiting_report_the_capture_contradicts_is_refused_when_it_appears(world: World) -> None:
    c = world.coordinator
    honest, liar = world.report("dev-b", 1), world.report("dev-a", 1, update_sha256="cd" * 32)
    c.ingest(honest, "dev-b")
    c.ingest(liar, "dev-a")
    assert c.gate.pending_count == 2
    world.capture()
    admission, committed = c.resolve()
    assert [v.device for v in committed] == ["dev-b"]
    assert [(v.device, v.reason) for v in admission.refused] == [("dev-a", Reason.UPDATE_MISMATCH)]
    assert c.contributions_in_ledger() == [honest] and c.gate.pending_count == 0
    assert c.gate.store.flag_counts() == {"dev-a": 1}


def test_report_of_another_devices_node_is_a_false_claim(world: World) -> None:
    world.capture()
    c = world.coordinator
    # dev-a names dev-b's node and its true update hash: the update exists, but dev-a did not send it.
    admission, _ = c.ingest(world.report("dev-a", 1, node=12), "dev-a")
    assert [v.reason for v in admission.refused] == [Reason.UPDATE_MISMATCH]
    assert c.gate.store.flag_counts() == {"dev-a": 1} and c.ledger.size == 0


def test_dropped_node_is_refused_without_a_flag(world: World) -> None:
    world.capture()
    c = world.coordinator
    admission, _ = c.ingest(world.report("dev-c", 1), "dev-c")
    assert [v.reason for v in admission.refused] == [Reason.UPDATE_DROPPED]
    assert c.gate.store.flag_counts() == {} and len(c.gate.store.refusals()) == 1 and c.ledger.size == 0


def test_waiting_reports_survive_a_restart_and_are_then_resolved(world: World) -> None:
    envelopes = [world.report("dev-a", 1), world.report("dev-b", 1)]
    for device, envelope in zip(("dev-a", "dev-b"), envelopes, strict=True):
        world.coordinator.ingest(envelope, device)
    c = world.restart()
    assert c.gate.pending_count == 2 and c.ledger.size == 0
    world.capture()
    _, committed = c.resolve()
    assert len(committed) == 2
    assert sorted(c.contributions_in_ledger()) == sorted(envelopes) and c.gate.pending_count == 0


def test_crash_between_the_ledger_commit_and_forgetting_the_waiting_row_logs_nothing_twice(world: World) -> None:
    envelope = world.report("dev-a", 1)
    world.coordinator.ingest(envelope, "dev-a")
    world.capture()
    admission = world.coordinator.gate.resolve(NOW_MS)
    world.coordinator.pipeline.commit(admission.ready, NOW_MS)  # committed, then "crash" before gate.logged
    c = world.restart()
    assert c.gate.pending_count == 1
    admission, committed = c.resolve()
    assert admission.ready == [] and committed == [] and c.gate.pending_count == 0
    assert c.contributions_in_ledger() == [envelope]


def test_round_never_captured_is_refused_after_the_grace_period_without_a_flag(world: World) -> None:
    c = world.coordinator
    envelope = world.report("dev-a", 1)
    c.ingest(envelope, "dev-a")
    grace_ms = int(GRACE_S * 1000)
    admission, _ = c.resolve(NOW_MS + grace_ms - 1)
    assert admission.refused == [] and c.gate.pending_count == 1
    admission, _ = c.resolve(NOW_MS + grace_ms)
    assert [v.reason for v in admission.refused] == [Reason.ROUND_NOT_CAPTURED]
    assert _refusal(world, admission.notices[0]).envelope_sha256 == hashlib.sha256(envelope).hexdigest()
    assert c.gate.pending_count == 0 and c.gate.store.flag_counts() == {} and c.ledger.size == 0
    # A capture written late changes nothing: the refusal was final and the device was told.
    world.capture()
    assert c.resolve()[1] == [] and c.ledger.size == 0


def test_other_bytes_for_a_waiting_report_are_refused_and_the_original_keeps_waiting(world: World) -> None:
    c = world.coordinator
    original = world.report("dev-a", 1)
    c.ingest(original, "dev-a")
    admission, _ = c.ingest(world.report("dev-a", 1, update_sha256="ef" * 32), "dev-a")
    assert [v.reason for v in admission.refused] == [Reason.EQUIVOCATION]
    assert c.gate.pending_count == 1
    world.capture()
    c.resolve()
    assert c.contributions_in_ledger() == [original]


def test_strike_votes_pass_the_gate_untouched(world: World) -> None:
    vote = StrikeVote(seq=1, device_time_ms=NOW_MS, target_buyer="acme", start_ms=NOW_MS).seal(world.keys["dev-a"])
    admission, verdicts = world.coordinator.ingest(vote, "dev-a", UpKind.STRIKE)
    assert admission.held == [] and [v.outcome for v in verdicts] == [Outcome.ACCEPTED]


def _membership(root: Path, world: World, device: str) -> Membership:
    record = MembershipRecord(
        mid=MID,
        device=device,
        member=f"member-{device}",
        mid_key=world.mid_key.verifier.text(),
        enrolment_url="http://127.0.0.1:1",
        broker=BrokerCredentials(host="127.0.0.1", port=1, tls=False, ca_pem="", username=device, password="x" * 24),
        enrolled_ms=NOW_MS,
    )
    return Membership(root, record, world.keys[device])


def test_the_agent_outbox_keeps_a_refused_report_and_stops_sending_it(world: World, tmp_path: Path) -> None:
    world.capture()
    membership = _membership(tmp_path / "agent", world, "dev-a")
    outbox = Outbox(tmp_path / "agent" / "outbox.sqlite", 1 << 20)
    try:
        liar = world.report("dev-a", 1, update_sha256="ab" * 32)
        seq = outbox.enqueue("report", lambda s: world.report("dev-a", s, update_sha256="ab" * 32), NOW_MS)
        assert seq == 1 and outbox.pending(1) is not None and outbox.pending(1).envelope == liar  # type: ignore[union-attr]
        admission, _ = world.coordinator.ingest(liar, "dev-a")
        _, payload = admission.notices[0]

        # A notice signed by another key, or for another device's key, settles nothing.
        forged = Refusal(
            device_key_id=world.keys["dev-a"].key_id.hex(),
            seq=1,
            envelope_sha256=hashlib.sha256(liar).hexdigest(),
            reason="update_mismatch",
            issued_ms=NOW_MS,
        ).seal(world.keys["dev-b"])
        assert not settle_refusal(outbox, membership, forged, NOW_MS)
        other = _membership(tmp_path / "agent-b", world, "dev-b")
        assert not settle_refusal(outbox, other, payload, NOW_MS)
        assert outbox.usage().pending == 1

        assert settle_refusal(outbox, membership, payload, NOW_MS)
        usage = outbox.usage()
        assert (usage.pending, usage.refused, usage.pending_bytes) == (0, 1, 0)
        assert outbox.due(NOW_MS + 10**9, 100) == []  # never resent
        (kept,) = outbox.refused()
        assert kept.envelope == liar and kept.reason == "update_mismatch" and "update" in kept.detail
        assert not settle_refusal(outbox, membership, payload, NOW_MS)  # a repeated notice changes nothing
    finally:
        outbox.close()


def test_a_report_that_waited_across_its_keys_revocation_is_refused(world: World) -> None:
    c = world.coordinator
    c.ingest(world.report("dev-a", 1), "dev-a")
    c.registry.revoke("dev-a", NOW_MS + 1)
    world.capture()
    admission, committed = c.resolve()
    assert committed == [] and [v.reason for v in admission.refused] == [Reason.REVOKED_KEY]
    assert c.gate.store.flag_counts() == {} and c.gate.pending_count == 0
    assert c.contributions_in_ledger() == []


def test_rounds_still_running_do_not_crowd_out_a_captured_one(world: World) -> None:
    c = world.coordinator
    # Three reports wait for round 3 (still running), received first; one waits for round 2.
    for seq, device in enumerate(("dev-a", "dev-b", "dev-c"), start=1):
        c.ingest(world.report(device, seq, server_round=3), device)
    late = world.report("dev-b", 9)
    c.ingest(late, "dev-b")
    world.capture()  # round 2 only
    admission = c.gate.resolve(NOW_MS, limit=1)
    assert [candidate.verdict.seq for candidate in admission.ready] == [9]
    c.gate.logged(c.pipeline.commit(admission.ready, NOW_MS))
    assert c.contributions_in_ledger() == [late] and c.gate.pending_count == 3


def _payload_type(envelope: bytes) -> str:
    return str(peek_envelope(envelope)[0])


def test_drift_corrected_reports_naming_the_captured_hashes_are_logged(world: World) -> None:
    c = world.coordinator
    waiting = world.report("dev-a", 1, drift=_drift(11))
    admission, _ = c.ingest(waiting, "dev-a")
    assert len(admission.held) == 1  # waits for its capture like any report, read back from the gate's file
    world.capture(drift=True)
    _, committed = c.resolve()
    assert [v.outcome for v in committed] == [Outcome.ACCEPTED]
    straight = world.report("dev-b", 1, drift=_drift(12))
    _, verdicts = c.ingest(straight, "dev-b")
    assert [v.outcome for v in verdicts] == [Outcome.ACCEPTED]
    assert c.contributions_in_ledger() == [waiting, straight]
    assert c.gate.store.refusals() == []


@pytest.mark.parametrize(
    ("drift_round", "reported"),
    [
        (True, (hashlib.sha256(b"another gradient").hexdigest(), _drift(11)[1])),
        (True, (_drift(11)[0], hashlib.sha256(b"another offset").hexdigest())),
        (True, _drift(12)),  # dev-b's true hashes
        (True, None),  # a report saying "no drift correction" for a drift-corrected round
        (False, _drift(11)),  # drift hashes for a round without drift correction
    ],
    ids=["gradient", "offset", "other-nodes", "null-for-drift-round", "hashes-for-plain-round"],
)
def test_drift_hashes_other_than_the_captured_ones_are_an_update_mismatch(
    world: World, drift_round: bool, reported: tuple[str | None, str | None] | None
) -> None:
    world.capture(drift=drift_round)
    c = world.coordinator
    envelope = world.report("dev-a", 1, drift=reported)
    admission, verdicts = c.ingest(envelope, "dev-a")
    assert verdicts == [] and c.ledger.size == 0
    assert [v.reason for v in admission.refused] == [Reason.UPDATE_MISMATCH]
    (flag,) = c.gate.store.refusals(flagged_only=True)
    assert flag.envelope == envelope
    expected = _drift(11) if drift_round else (None, None)
    assert (flag.capture["gradient_sha256"], flag.capture["drift_offset_sha256"]) == expected
    found = (flag.capture["reported_gradient_sha256"], flag.capture["reported_drift_offset_sha256"])
    assert found == (reported or (None, None))


def test_reports_without_drift_hashes_of_a_round_without_drift_correction_match(world: World) -> None:
    world.capture()
    c = world.coordinator
    envelope = world.report("dev-a", 1)
    assert _payload_type(envelope) == ContributionReport.PAYLOAD_TYPE
    assert json.loads(peek_envelope(envelope)[1])["gradient_sha256"] is None
    _, verdicts = c.ingest(envelope, "dev-a")
    assert [v.outcome for v in verdicts] == [Outcome.ACCEPTED]
    assert c.contributions_in_ledger() == [envelope]


def test_a_report_is_taken_only_on_the_report_topic(world: World) -> None:
    world.capture(drift=True)
    envelope = world.report("dev-a", 1, drift=_drift(11))
    for kind in (UpKind.STRIKE, UpKind.HEARTBEAT):
        _, verdicts = world.coordinator.ingest(envelope, "dev-a", kind)
        assert [(v.outcome, v.reason) for v in verdicts] == [(Outcome.REJECTED, Reason.WRONG_TYPE)]
        assert "contribution-report.v2" in verdicts[0].error
    # Any other payloadType on up/report is still wrong_type, after the signature was checked.
    vote = StrikeVote(seq=2, device_time_ms=NOW_MS, target_buyer="acme", start_ms=NOW_MS).seal(world.keys["dev-a"])
    _, verdicts = world.coordinator.ingest(vote, "dev-a")
    assert [(v.outcome, v.reason) for v in verdicts] == [(Outcome.REJECTED, Reason.WRONG_TYPE)]
    # A payload naming one drift hash only is signed and typed right, and still refused by its schema.
    doc = json.loads(peek_envelope(envelope)[1])
    doc.update(seq="3", drift_offset_sha256=None)
    half = seal(ContributionReport.PAYLOAD_TYPE, json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(),
                world.keys["dev-a"])  # fmt: skip
    _, verdicts = world.coordinator.ingest(half, "dev-a")
    assert [(v.outcome, v.reason) for v in verdicts] == [(Outcome.REJECTED, Reason.MALFORMED)]
    assert world.coordinator.ledger.size == 0


# The invitation nonce: `job start` gives each invited device its own nonce and records it in the job book; a report
# must carry its signer's nonce of the run's job (wrong_round_nonce otherwise: refused, never logged, not flagged).


@pytest.mark.parametrize("captured", [True, False], ids=["after-capture", "before-capture"])
def test_a_nonce_the_mid_never_issued_is_refused_and_the_other_reports_of_the_batch_are_not(
    world: World, captured: bool
) -> None:
    if captured:
        world.capture()
    c = world.coordinator
    forged = "0f" * 16
    wrong, right = world.report("dev-a", 1, nonce=forged), world.report("dev-b", 1)
    admission, verdicts = c.ingest_batch([(wrong, "dev-a"), (right, "dev-b")])
    (refused,) = admission.refused
    assert (refused.device, refused.outcome, refused.reason) == ("dev-a", Outcome.REJECTED, Reason.WRONG_ROUND_NONCE)
    assert "did not issue" in refused.error
    notice = _refusal(world, admission.notices[0])
    assert (notice.seq, notice.reason) == (1, "wrong_round_nonce")
    assert notice.envelope_sha256 == hashlib.sha256(wrong).hexdigest()
    assert forged not in notice.detail and world.nonces["dev-a"] not in notice.detail  # no nonce leaves the MID
    (row,) = c.gate.store.refusals()
    assert (row.device, row.reason, row.flagged, row.envelope) == ("dev-a", "wrong_round_nonce", False, wrong)
    assert c.gate.store.flag_counts() == {}
    if captured:
        assert [(v.device, v.outcome) for v in verdicts] == [("dev-b", Outcome.ACCEPTED)]
    else:
        # The refusal needs no capture: only the honest report waits for it.
        assert [v.device for v in admission.held] == ["dev-b"] and c.gate.pending_count == 1
        world.capture()
        c.resolve()
    assert c.contributions_in_ledger() == [right]
    # A resend is refused again from the stored row; nothing more is kept or logged.
    admission, _ = c.ingest(wrong, "dev-a")
    assert [v.reason for v in admission.refused] == [Reason.WRONG_ROUND_NONCE] and len(admission.notices) == 1
    assert len(c.gate.store.refusals()) == 1 and c.contributions_in_ledger() == [right]


def test_the_nonce_of_another_devices_invitation_to_the_same_job_is_refused(world: World) -> None:
    world.capture()
    c = world.coordinator
    # Every hash of dev-a's report is true; only its nonce is the one the job's invitation gave dev-b.
    stolen = world.report("dev-a", 1, nonce=world.nonces["dev-b"])
    admission, verdicts = c.ingest(stolen, "dev-a")
    assert verdicts == [] and [v.reason for v in admission.refused] == [Reason.WRONG_ROUND_NONCE]
    assert "another device's invitation" in admission.refused[0].error
    assert c.contributions_in_ledger() == [] and c.gate.store.flag_counts() == {}
    # dev-b's own report with that nonce is still its to log.
    _, verdicts = c.ingest(world.report("dev-b", 1), "dev-b")
    assert [v.outcome for v in verdicts] == [Outcome.ACCEPTED]


def test_a_nonce_is_good_only_for_the_run_of_its_job_and_for_the_devices_it_invited(world: World) -> None:
    other_run = RUN + 1
    other_nonce = secrets.token_hex(16)
    write_job_record(world.book, "job-78", other_run, {"dev-a": (NODES["dev-a"], other_nonce)})
    world.capture()
    world.capture(run=other_run)
    c = world.coordinator
    # dev-a's nonce of its other job, on a report of this run (an agent moved to a new job signs with the new nonce).
    admission, _ = c.ingest(world.report("dev-a", 1, nonce=other_nonce), "dev-a")
    assert [v.reason for v in admission.refused] == [Reason.WRONG_ROUND_NONCE]
    # dev-b's nonce of this run's job, on a report of the other run, whose job did not invite dev-b.
    admission, _ = c.ingest(world.report("dev-b", 1, run=other_run), "dev-b")
    assert [v.reason for v in admission.refused] == [Reason.WRONG_ROUND_NONCE]
    assert "did not invite" in admission.refused[0].error
    assert c.contributions_in_ledger() == []
    right = world.report("dev-a", 2, nonce=other_nonce, run=other_run)
    _, verdicts = c.ingest(right, "dev-a")
    assert [v.outcome for v in verdicts] == [Outcome.ACCEPTED] and c.contributions_in_ledger() == [right]


def test_a_run_no_job_record_names_waits_for_its_capture_and_is_then_refused(world: World) -> None:
    """`job start` records the run id before any round of the run can end, so a missing record is final only once
    the round is captured; a run started outside `job start` gets nothing logged."""
    unknown_run = RUN + 100
    c = world.coordinator
    envelope = world.report("dev-a", 1, run=unknown_run)
    admission, _ = c.ingest(envelope, "dev-a")
    assert len(admission.held) == 1 and admission.refused == []
    world.capture(run=unknown_run)
    admission, committed = c.resolve()
    assert committed == [] and [v.reason for v in admission.refused] == [Reason.WRONG_ROUND_NONCE]
    assert "no job" in admission.refused[0].error
    assert c.gate.pending_count == 0 and c.gate.store.flag_counts() == {} and c.contributions_in_ledger() == []
    # Straight after the capture too: refused at once.
    admission, _ = c.ingest(world.report("dev-b", 1, run=unknown_run), "dev-b")
    assert [v.reason for v in admission.refused] == [Reason.WRONG_ROUND_NONCE] and c.ledger.size == 0


def test_a_job_record_written_after_the_reports_arrived_decides_them(world: World) -> None:
    late_run = RUN + 200
    nonces = {"dev-a": secrets.token_hex(16), "dev-b": secrets.token_hex(16)}
    c = world.coordinator
    right = world.report("dev-a", 1, nonce=nonces["dev-a"], run=late_run)
    wrong = world.report("dev-b", 1, run=late_run)  # dev-b's nonce of RUN's job
    c.ingest_batch([(right, "dev-a"), (wrong, "dev-b")])
    assert c.gate.pending_count == 2
    write_job_record(world.book, "job-late", late_run, {d: (NODES[d], n) for d, n in nonces.items()})
    world.capture(run=late_run)
    admission, committed = c.resolve()
    assert [v.device for v in committed] == ["dev-a"] and c.contributions_in_ledger() == [right]
    assert [(v.device, v.reason) for v in admission.refused] == [("dev-b", Reason.WRONG_ROUND_NONCE)]


def test_the_gate_reads_the_job_book_after_a_restart(world: World) -> None:
    world.capture()
    c = world.restart()
    admission, verdicts = c.ingest_batch(
        [(world.report("dev-a", 1), "dev-a"), (world.report("dev-b", 1, nonce=world.nonces["dev-a"]), "dev-b")]
    )
    assert [v.device for v in verdicts] == ["dev-a"]
    assert [(v.device, v.reason) for v in admission.refused] == [("dev-b", Reason.WRONG_ROUND_NONCE)]


class _Reads:
    """Counts the job book's folder listings and file reads of coordinator.gate.issued_nonces."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.listings = self.files = 0
        listdir, read_bytes = os.listdir, Path.read_bytes

        def counted_listdir(path: Path) -> list[str]:
            self.listings += 1
            return listdir(path)

        def counted_read_bytes(path: Path) -> bytes:
            self.files += 1
            return read_bytes(path)

        monkeypatch.setattr(issued_nonces.os, "listdir", counted_listdir)
        monkeypatch.setattr(issued_nonces.Path, "read_bytes", counted_read_bytes)


def _age(folder: Path) -> None:
    """Date the folder back past RACY_NS, as it is once no job was written for a while."""
    then = time.time_ns() - 10 * RACY_NS
    os.utime(folder, ns=(then, then))


def test_issued_nonces_parse_each_job_file_once_and_pick_up_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    book = tmp_path / "job-book"
    issued = IssuedNonces(book)
    assert issued.for_run(5) is None  # no job started yet: no folder
    write_job_record(book, "job-5", 5, {"d-one": (1, "aa" * 16)})
    _age(book)
    reads = _Reads(monkeypatch)
    for _ in range(100):
        assert issued.for_run(5) == {"d-one": "aa" * 16}
    assert (reads.listings, reads.files) == (1, 1)
    # An unknown run in an unchanged folder costs one stat: no listing, no read.
    for _ in range(100):
        assert issued.for_run(6) is None
    assert (reads.listings, reads.files) == (1, 1)
    write_job_record(book, "job-6", 6, {"d-two": (2, "bb" * 16)})
    assert issued.for_run(6) == {"d-two": "bb" * 16}
    assert reads.files == 2  # job-5, which names its run, is not read again
    # A scan of a folder written within RACY_NS is not trusted: a write in the same clock tick is not missed.
    listed = reads.listings
    assert issued.for_run(7) is None and issued.for_run(7) is None
    assert reads.listings == listed + 2


def test_issued_nonces_wait_for_the_run_id_and_skip_unreadable_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book_dir = tmp_path / "job-book"
    write_job_record(book_dir, "job-9", 9, {"d-one": (1, "cc" * 16)})
    book = JobBook(book_dir)
    record = book.read("job-9")
    assert record is not None
    record.run_id, record.status = None, "inviting"  # invited, `flwr run` not returned yet
    book.write(record)
    (book_dir / "broken.json").write_text("{not json")
    issued = IssuedNonces(book_dir)
    with caplog.at_level(logging.ERROR, logger="midgate.federation"):
        assert issued.for_run(9) is None
    assert "job record unreadable" in caplog.text
    record.run_id, record.status = 9, "running"
    book.write(record)
    assert issued.for_run(9) == {"d-one": "cc" * 16}
