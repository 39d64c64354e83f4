"""Members check the MID from their own devices, against the coordinator's real HTTP app (uvicorn on loopback):
agents' cosignatures make a checkpoint witnessed; a device-signed statement request gets its member's settlement and
royalty leaves with inclusion proofs and nothing else (unsigned, foreign, replayed, stale and revoked requests are
refused with their reason codes); the agent verifies every line and refuses a tampered one; its kept receipts are
proven offline and under the witnessed checkpoint, and a tampered stored envelope or receipt is refused."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from mqtt_fixtures import contribution_report, free_port, wait_for_port
from prometheus_client import CollectorRegistry

from coordinator.buyer.http import RevenueDesk
from coordinator.enrolment.enroller import Enroller
from coordinator.ledger.store import LedgerStore
from coordinator.ledger.witnesses import MAX_COSIGNATURE_BODY, WitnessDesk, quorum_of
from coordinator.mid_key import mid_key_name
from coordinator.registry.device_keys import DeviceKeys
from coordinator.registry.store import Registry
from coordinator.royalties import KnobPolicy, MemberAttribution, ModelAttribution, RoyaltyPolicy, settle_job
from coordinator.royalties.ledger_records import append_split, report_revenue
from coordinator.royalties.statement_http import REQUEST_WINDOW_MS, StatementDesk
from coordinator.serve.http import build_http_app
from edge.agent.ledger_client import LedgerClient, RefusedByMidError
from edge.agent.ledger_view import LedgerView
from edge.agent.membership import Membership, MembershipRecord
from edge.agent.outbox import Outbox
from edge.agent.portfolio import collect, render_portfolio, totals_minor
from edge.agent.receipts import ReceiptStatus, check_offline, check_witnessed, verify_membership_receipts
from edge.agent.statement import fetch_statement, render_statement
from edge.agent.witnessing import cosign_candidate
from protocol.checkpoint import open_checkpoint
from protocol.enrolment import BrokerCredentials
from protocol.errors import (
    EquivocationError,
    MalformedError,
    QuorumNotMetError,
    Reason,
    RootMismatchError,
)
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind
from protocol.ledger_api import PurposeList, PurposeTerm, StatementProof, VerifiedStatement, verify_statement
from protocol.messages import MAX_TIME_MS, MIN_TIME_MS, ReceiptBatch, StatementRequest, receipt_batch_json
from protocol.note import parse_note
from protocol.witness import Cosigner

pytest_plugins = ["mqtt_fixtures"]

MID = "riverside"
POLICY = RoyaltyPolicy(
    version=1, fee_bps=2000, knob=KnobPolicy(base_price_minor=1_000, min_price_minor=100, max_price_minor=10_000)
)
ALL_TIME = (MIN_TIME_MS, MAX_TIME_MS)
CREATED = 1_800_000_000_000
MEMBERS = ("ann", "bob", "cat")
VOCABULARY = PurposeList(
    policy_version=2, purposes=(PurposeTerm(code="research", dpv="dpv:ResearchAndDevelopment", label="R&D"),)
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Mid:
    url: str
    ledger: LedgerStore
    log_key: SignerKey
    registry: Registry
    keys: dict[str, SignerKey]
    refusals: list[Reason]

    def membership(self, member: str, tmp_path: Path) -> Membership:
        key = self.keys[member]
        record = MembershipRecord(
            mid=MID,
            device=key.name,
            member=member,
            mid_key=self.log_key.verifier.text(),
            enrolment_url=self.url,
            broker=BrokerCredentials(host="127.0.0.1", port=1, username=key.name, password="x" * 16, tls=False),
            enrolled_ms=CREATED,
        )
        directory = tmp_path / "mids" / f"{MID}-{member}"
        directory.mkdir(parents=True, exist_ok=True)
        return Membership(directory, record, key)

    def cosign(self, *members: str) -> list[int | None]:
        """Each member's agent cosigns the MID's candidate checkpoint, as its witness loop does."""
        client = LedgerClient(self.url)
        sizes = []
        for member in members:
            key = self.keys[member]
            view = LedgerView(self.log_key.verifier, key.key_id.hex(), client.consistency, None)
            sizes.append(cosign_candidate(view, client, Cosigner(key), _now_ms() // 1000))
        return sizes

    def request(self, member: str, *, key: SignerKey | None = None, **changes: object) -> bytes:
        fields: dict[str, object] = {
            "mid": MID,
            "device": self.keys[member].name,
            "period_start_ms": ALL_TIME[0],
            "period_end_ms": ALL_TIME[1],
            "nonce": _nonce(),
            "issued_ms": _now_ms(),
        }
        return StatementRequest.model_validate({**fields, **changes}).seal(key or self.keys[member])


_NONCES = iter(range(1, 1 << 30))


def _nonce() -> str:
    return f"{next(_NONCES):032x}"


def _no_broker(device: str, password: str) -> BrokerCredentials:
    raise AssertionError("no enrolment in this test")


def _split(job: str, payment: int, *names: str) -> bytes:
    members = [
        MemberAttribution(member=name, value_units=100 * (i + 1), knob_milli=0, rounds=3, excluded_rounds=0)
        for i, name in enumerate(names)
    ]
    attribution = ModelAttribution(job_id=job, model_version=f"{job}-v1", policy=POLICY, members=members)
    return settle_job(attribution, payment, record_id=f"{job}.settlement", created_ms=CREATED, currency="EUR")


@pytest.fixture
def mid(tmp_path: Path) -> Iterator[Mid]:
    log_key = SignerKey.generate(mid_key_name(MID))
    ledger = LedgerStore.open(tmp_path / "ledger.sqlite", log_key)
    registry = Registry(tmp_path / "registry.sqlite")
    keys = {}
    for member in MEMBERS:
        key = keys[member] = SignerKey.generate(f"d-{member}")
        registry.add_invite(f"invite-{member}", member, CREATED, CREATED + 10**9)
        registry.redeem_invite(f"invite-{member}", CREATED, key.name, key.verifier, "unused")
    ledger.append_leaves([Leaf(LeafKind.ENROL, b"enrol-%d" % i) for i in range(3)])
    append_split(ledger, _split("job-1", 50_000, "ann", "bob"))
    append_split(ledger, _split("job-2", 7_000, "cat"))
    append_split(ledger, _split("job-3", 9_000, "ann", "cat"))
    devices = DeviceKeys(registry)
    witnesses = WitnessDesk(ledger, devices.witnesses, quorum_max=3)
    refusals: list[Reason] = []
    app = build_http_app(
        enroller=Enroller(MID, registry, ledger, log_key, _no_broker, lambda device: None, 16 * 1024),
        ledger=ledger,
        revenue=RevenueDesk(MID, "EUR", {}, ledger, 16 * 1024),
        metrics=CollectorRegistry(),
        on_refusal=refusals.append,
        witnesses=witnesses,
        statements=StatementDesk(MID, ledger, devices, witnesses),
        knob_policy=(lambda: POLICY, "EUR"),
        purposes=lambda: VOCABULARY,
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        yield Mid(f"http://127.0.0.1:{port}", ledger, log_key, registry, keys, refusals)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        registry.close()
        ledger.close()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- witnesses ------------------------------------------------------------------------------------------------------


def test_the_quorum_is_a_majority_of_the_devices_up_to_its_cap() -> None:
    assert [quorum_of(n, 3) for n in (0, 1, 2, 3, 4, 5, 9, 100)] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert quorum_of(100, 1) == 1


def test_cosignatures_of_a_quorum_of_devices_make_a_checkpoint_witnessed(mid: Mid) -> None:
    client = LedgerClient(mid.url)
    listed = client.witnesses()
    assert listed.quorum == 2 and [w.device for w in listed.witnesses] == ["d-ann", "d-bob", "d-cat"]
    with pytest.raises(RefusedByMidError) as refused:
        client.witnessed_checkpoint()
    assert (refused.value.status, refused.value.reason) == (503, "quorum_not_met")

    first = mid.ledger.size
    assert mid.cosign("ann") == [first]
    # The log grows, but the candidate stays the size a witness already cosigned, so the next one meets it there.
    mid.ledger.append_leaves([Leaf(LeafKind.CONTRIBUTION, b"later")])
    assert open_checkpoint(client.candidate_checkpoint(), mid.log_key.verifier).checkpoint.size == first
    assert mid.cosign("ann") == [None]  # already cosigned: nothing posted twice
    assert mid.cosign("bob") == [first]

    note = client.witnessed_checkpoint()
    policy = listed.policy()
    assert policy.check(note, mid.log_key.verifier).checkpoint.size == first
    assert len(parse_note(note).signatures) == 3  # the MID's signature and two cosignatures
    # Once witnessed, the candidate is the latest checkpoint again.
    assert open_checkpoint(client.candidate_checkpoint(), mid.log_key.verifier).checkpoint.size == first + 1


def test_a_cosignature_the_mid_cannot_check_is_refused_and_nothing_is_stored(mid: Mid) -> None:
    size = mid.ledger.size
    before = mid.ledger.checkpoint(size)
    text = parse_note(before).text
    stranger = Cosigner(SignerKey.generate("d-stranger"))
    url = mid.url + "/v1/cosignature"
    assert _post(url, stranger.cosigned_note(text, 1), "text/plain")[0] == 403  # unknown_key
    forged = text.replace(f"\n{size}\n", f"\n{size - 1}\n")
    assert _post(url, Cosigner(mid.keys["ann"]).cosigned_note(forged, 1), "text/plain")[0] == 409  # inconsistent
    bad = bytearray(Cosigner(mid.keys["ann"]).cosigned_note(text, 1))
    bad[-10] = ord("A") if bad[-10] != ord("A") else ord("B")  # the signature's last bytes
    assert _post(url, bytes(bad), "text/plain")[0] == 403  # bad_signature
    assert _post(url, b"x" * (MAX_COSIGNATURE_BODY + 1), "text/plain")[0] == 413
    assert mid.refusals == [Reason.UNKNOWN_KEY, Reason.INCONSISTENT, Reason.BAD_SIGNATURE, Reason.TOO_LARGE]
    assert mid.ledger.checkpoint(size) == before


def test_an_agent_never_cosigns_a_checkpoint_inconsistent_with_its_own(mid: Mid, tmp_path: Path) -> None:
    client = LedgerClient(mid.url)
    key = mid.keys["ann"]
    forked = LedgerStore.open(tmp_path / "fork.sqlite", mid.log_key)
    for index, data in mid.ledger.leaves(0, mid.ledger.size):
        forked.append([data if index else b"rewritten history"])
    trusted = forked.checkpoint()  # same size, another root, signed by the same MID key
    view = LedgerView(mid.log_key.verifier, key.key_id.hex(), client.consistency, trusted)
    with pytest.raises(EquivocationError):
        cosign_candidate(view, client, Cosigner(key), 1)
    assert len(parse_note(mid.ledger.checkpoint()).signatures) == 1
    forked.close()


# --- statements -----------------------------------------------------------------------------------------------------


def _statement(mid: Mid, member: str, **changes: object) -> tuple[int, dict[str, object]]:
    return _post(mid.url + "/v1/member/statement", mid.request(member, **changes))


def test_a_member_gets_its_own_lines_and_verifies_each(mid: Mid, tmp_path: Path) -> None:
    mid.cosign("ann", "bob")
    for member, jobs in (("ann", ["job-1", "job-3"]), ("bob", ["job-1"]), ("cat", ["job-2", "job-3"])):
        membership = mid.membership(member, tmp_path)
        statement = fetch_statement(membership, LedgerClient(mid.url), None, ALL_TIME, _now_ms())
        assert [line.job_id for line in statement.lines] == jobs, member
        assert all(line.reason == "paid" and line.amount_minor > 0 for line in statement.lines)
        printed = render_statement(MID, member, statement)
        assert all(f"job {job}" in printed for job in jobs) and "Total:" in printed
        # Each line says the knob the job priced the member at, and the price it gave, as the record holds them.
        assert {(line.knob_milli, line.price_minor) for line in statement.lines} == {(0, 1_000)}
        assert printed.count("(paid; knob +0.000, price 1000 EUR; record ") == len(jobs)
    # ann's lines are what the records pay her: a third of 80 % of 50,000 (bob, with twice her value, also gets the
    # leftover unit of the larger remainder) and a third of 80 % of 9,000.
    ann = fetch_statement(mid.membership("ann", tmp_path), LedgerClient(mid.url), None, ALL_TIME, _now_ms())
    assert [line.amount_minor for line in ann.lines] == [13_333, 2_400]
    assert ann.totals_minor == {"EUR": 15_733}


def test_the_answer_holds_only_records_that_pay_the_requesting_member(mid: Mid) -> None:
    mid.cosign("ann", "bob")
    status, answer = _statement(mid, "bob")
    assert status == 200
    proof = StatementProof.model_validate_json(json.dumps(answer))
    assert proof.member == "bob" and len(proof.leaves) == 1
    leaf = base64.b64decode(proof.leaves[0].leaf)
    assert b'"member":"bob"' in leaf and b"job-2" not in leaf and b"job-3" not in leaf
    # The period narrows what is sent.
    status, answer = _statement(mid, "bob", period_start_ms=CREATED + 1)
    assert status == 200 and StatementProof.model_validate_json(json.dumps(answer)).leaves == ()


def test_statement_requests_are_refused_unsigned_foreign_replayed_stale_or_revoked(mid: Mid) -> None:
    url = mid.url + "/v1/member/statement"
    unsigned = StatementRequest(
        mid=MID,
        device="d-ann",
        period_start_ms=ALL_TIME[0],
        period_end_ms=ALL_TIME[1],
        nonce=_nonce(),
        issued_ms=_now_ms(),
    ).canonical_json()
    status, answer = _post(url, unsigned)  # the request's JSON without its envelope and signature
    assert (status, answer["reason"]) == (400, "malformed")
    stranger = SignerKey.generate("d-ann")  # the right device name, another key
    assert _post(url, mid.request("ann", key=stranger))[0] == 403
    assert _post(url, mid.request("ann", key=mid.keys["bob"]))[0] == 403  # bob's key cannot ask as ann
    replayed = mid.request("ann")
    assert _post(url, replayed)[0] == 200
    assert _post(url, replayed)[0] == 409
    assert _post(url, mid.request("ann", issued_ms=_now_ms() - REQUEST_WINDOW_MS - 60_000))[0] == 403
    assert _post(url, mid.request("ann", mid="elsewhere"))[0] == 422
    mid.registry.revoke("d-cat", CREATED + 1)
    assert _post(url, mid.request("cat"))[0] == 403
    assert mid.refusals == [
        Reason.MALFORMED,
        Reason.UNKNOWN_KEY,
        Reason.UNKNOWN_KEY,
        Reason.REPLAYED,
        Reason.STALE_REQUEST,
        Reason.POLICY_VIOLATION,
        Reason.REVOKED_KEY,
    ]


def test_a_member_who_left_still_reads_and_verifies_its_lines_with_its_departed_key(mid: Mid, tmp_path: Path) -> None:
    mid.cosign("ann", "bob")
    revoked = mid.registry.record_departure("cat", 99, CREATED + 1)  # cat's logged LeaveNotice
    assert revoked == ["d-cat"] and mid.registry.device("d-cat").revoked  # type: ignore[union-attr]
    # After cat left, the buyer reports revenue on a model cat helped train: the royalty still pays cat.
    report_revenue(mid.ledger, "job-3-v1", 3_000, record_id="royalty-1", created_ms=CREATED + 2, currency="EUR")
    mid.cosign("ann", "bob")
    statement = fetch_statement(mid.membership("cat", tmp_path), LedgerClient(mid.url), None, ALL_TIME, _now_ms())
    assert [(line.kind, line.job_id) for line in statement.lines] == [
        ("settlement", "job-2"),
        ("settlement", "job-3"),
        ("royalty", "job-3"),
    ]
    assert statement.lines[-1].amount_minor > 0
    # Only its own lines: the departed key asking as another device is refused, as before.
    url = mid.url + "/v1/member/statement"
    assert _post(url, mid.request("ann", key=mid.keys["cat"]))[0] == 403
    # A key the operator revoked (not by leaving) reads nothing.
    mid.registry.revoke("d-bob", CREATED + 2)
    status, answer = _post(url, mid.request("bob"))
    assert (status, answer["reason"]) == (403, "revoked_key")


def test_the_knob_price_endpoint_says_what_a_knob_yields_and_refuses_a_bad_knob(mid: Mid) -> None:
    client = LedgerClient(mid.url)
    assert client.purposes() == VOCABULARY  # what consent chooses from
    price = client.knob_price(-1000)
    assert (price.knob_milli, price.price_minor, price.lowest_minor, price.currency) == (-1000, 500, 500, "EUR")
    assert price.highest_minor == 2000 and price.base_price_minor == 1000 and price.policy_version == POLICY.version
    # "%C2%B9" is "¹", a digit to str.isdigit() but not to int() (found by the schema fuzzer: it was a 500).
    bads = (("1001", "policy_violation"), ("0.5", "malformed"), ("x" * 30, "malformed"), ("%C2%B9", "malformed"))
    for bad, reason in (*bads, ("--5", "malformed"), ("-", "malformed")):
        with pytest.raises(RefusedByMidError) as refused:
            client._call("GET", f"/v1/member/knob-price?knob_milli={bad}", limit=4096)
        assert refused.value.reason == reason


def test_the_portfolio_totals_its_verified_lines_and_a_tampered_statement_counts_nothing(
    mid: Mid, tmp_path: Path
) -> None:
    mid.cosign("ann", "bob")

    class Tampering(LedgerClient):
        """A MID (or a path to it) that alters one byte of the first leaf it sends."""

        def statement(self, request_envelope: bytes) -> StatementProof:
            proof = super().statement(request_envelope)
            leaf = bytearray(base64.b64decode(proof.leaves[0].leaf))
            leaf[-20] ^= 1
            first = proof.leaves[0].model_copy(update={"leaf": base64.b64encode(bytes(leaf)).decode()})
            return proof.model_copy(update={"leaves": (first, *proof.leaves[1:])})

    ann, bob, cat = (mid.membership(m, tmp_path) for m in ("ann", "bob", "cat"))

    def fetch(membership: Membership) -> VerifiedStatement:
        client = Tampering(mid.url) if membership is cat else LedgerClient(mid.url)
        return fetch_statement(membership, client, None, ALL_TIME, _now_ms())

    earnings = collect([ann, bob, cat], fetch)
    verified = [e.statement for e in earnings if e.statement is not None]
    lines = [line.amount_minor for statement in verified for line in statement.lines]
    assert totals_minor(earnings) == {"EUR": sum(lines)} and len(lines) == 3  # ann's two lines and bob's one
    assert earnings[2].statement is None and earnings[2].problem.startswith("refused: root_mismatch")
    printed = render_portfolio(earnings)
    assert f"Total across MIDs: {sum(lines)} EUR minor units" in printed
    assert "NOT COUNTED, refused: root_mismatch" in printed


def _answer(mid: Mid, member: str) -> StatementProof:
    status, answer = _statement(mid, member)
    assert status == 200, answer
    return StatementProof.model_validate_json(json.dumps(answer))


def _verify(mid: Mid, member: str, proof: StatementProof) -> None:
    policy = LedgerClient(mid.url).witnesses().policy()
    verify_statement(proof, mid=MID, member=member, period=ALL_TIME, log_vkey=mid.log_key.verifier, policy=policy)


def test_a_tampered_line_is_refused(mid: Mid) -> None:
    mid.cosign("ann", "bob")
    proof = _answer(mid, "ann")
    _verify(mid, "ann", proof)
    leaf = base64.b64decode(proof.leaves[0].leaf)
    assert b'"amount_minor":13333' in leaf
    richer = leaf.replace(b'"amount_minor":13333', b'"amount_minor":93334')
    tampered = proof.model_copy(
        update={
            "leaves": (
                proof.leaves[0].model_copy(update={"leaf": base64.b64encode(richer).decode()}),
                *proof.leaves[1:],
            )
        }
    )
    with pytest.raises(RootMismatchError) as refused:
        _verify(mid, "ann", tampered)
    assert refused.value.details["leaf_index"] == proof.leaves[0].index
    # The true leaf with one hash of its path changed.
    path = (base64.b64encode(bytes(32)).decode(), *proof.leaves[0].path[1:])
    changed = proof.model_copy(
        update={"leaves": (proof.leaves[0].model_copy(update={"path": path}), *proof.leaves[1:])}
    )
    with pytest.raises(RootMismatchError):
        _verify(mid, "ann", changed)
    # Another member's record, with its true proof, is no line of ann's.
    with pytest.raises(MalformedError, match="does not pay this member"):
        _verify(mid, "bob", proof.model_copy(update={"member": "bob"}))


def test_a_statement_under_a_checkpoint_without_its_quorum_is_refused(mid: Mid, tmp_path: Path) -> None:
    mid.cosign("ann")  # one of the two cosignatures the quorum needs
    proof = _answer(mid, "ann")
    with pytest.raises(QuorumNotMetError):
        _verify(mid, "ann", proof)
    with pytest.raises(QuorumNotMetError):
        fetch_statement(mid.membership("ann", tmp_path), LedgerClient(mid.url), None, ALL_TIME, _now_ms())


def test_the_statement_checkpoint_must_be_consistent_with_the_member_s_own(mid: Mid, tmp_path: Path) -> None:
    mid.cosign("ann", "bob")
    membership, client = mid.membership("ann", tmp_path), LedgerClient(mid.url)
    # The member trusts a tree of the witnessed size with another root, signed by the same MID key: a fork.
    forked = LedgerStore.open(tmp_path / "fork.sqlite", mid.log_key)
    forked.append([b"another history"] * mid.ledger.size)
    with pytest.raises(EquivocationError):
        fetch_statement(membership, client, forked.checkpoint(), ALL_TIME, _now_ms())
    # A bigger forked tree: the MID cannot prove the witnessed one is a prefix of it, and nothing is printed.
    forked.append([b"more of it"] * 5)
    with pytest.raises(RefusedByMidError, match="bad_proof"):
        fetch_statement(membership, client, forked.checkpoint(), ALL_TIME, _now_ms())
    forked.close()


# --- the agent's kept receipts --------------------------------------------------------------------------------------


def _receipted_outbox(mid: Mid, membership: Membership, reports: int) -> Outbox:
    """An outbox whose reports the MID logged and receipted (one ReceiptBatch each, as ingest sends them)."""
    outbox = Outbox(membership.outbox_path, 1 << 20)
    client = LedgerClient(mid.url)
    view = LedgerView(mid.log_key.verifier, membership.key.key_id.hex(), client.consistency, None)
    device = membership.device
    taken = outbox.enqueue_many(
        [
            ("report", lambda seq, i=i: contribution_report(i, device, seq, CREATED).seal(membership.key), None)
            for i in range(reports)
        ],
        CREATED,
    )
    for _, seq in taken:
        pending = outbox.pending(seq)
        assert pending is not None
        index = mid.ledger.append_leaves([Leaf(LeafKind.CONTRIBUTION, pending.envelope)]).first_index
        note = mid.ledger.checkpoint()
        batch = ReceiptBatch.parse(receipt_batch_json(note, [(seq, index, mid.ledger.inclusion_proof(index))], CREATED))
        outcome = view.settle_batch(batch, lambda s: (LeafKind.CONTRIBUTION, outbox.pending(s).envelope))  # type: ignore[union-attr]
        assert outbox.settle(outcome.settled, CREATED) == 1
    assert view.trusted_note is not None
    outbox.set_meta("trusted_checkpoint", view.trusted_note)
    return outbox


def test_kept_receipts_are_proven_offline_and_under_the_witnessed_checkpoint(mid: Mid, tmp_path: Path) -> None:
    membership = mid.membership("ann", tmp_path)
    outbox = _receipted_outbox(mid, membership, 3)
    kept = outbox.kept_receipts()
    assert [r.seq for r in kept] == [1, 2, 3] and all(r.envelope and r.checkpoint and r.path for r in kept)
    checks, _ = check_offline(kept, membership.key.verifier, mid.log_key.verifier)
    assert [c.status for c in checks] == [ReceiptStatus.PROVEN] * 3
    outbox.close()

    mid.cosign("ann", "bob")  # witnesses the tree holding all three
    mid.ledger.append_leaves([Leaf(LeafKind.CONTRIBUTION, b"someone else's")])
    report = verify_membership_receipts(membership, 1 << 20, against_witnesses=True)
    assert report.ok and report.witnessed_size == mid.ledger.size - 1
    assert [c.status for c in report.checks] == [ReceiptStatus.WITNESSED] * 3


def test_receipts_newer_than_the_witnessed_checkpoint_await_witnesses(mid: Mid, tmp_path: Path) -> None:
    mid.cosign("ann", "bob")
    membership = mid.membership("ann", tmp_path)
    outbox = _receipted_outbox(mid, membership, 2)
    checks, proven = check_offline(outbox.kept_receipts(), membership.key.verifier, mid.log_key.verifier)
    client = LedgerClient(mid.url)
    view = LedgerView(
        mid.log_key.verifier, membership.key.key_id.hex(), client.consistency, outbox.get_meta("trusted_checkpoint")
    )
    _, updated = check_witnessed(checks, proven, view, client)
    assert [c.status for c in updated] == [ReceiptStatus.AWAITING_WITNESSES] * 2
    outbox.close()


@pytest.mark.parametrize("column", ["envelope", "path", "note"])
def test_a_tampered_stored_envelope_or_receipt_is_refused(mid: Mid, tmp_path: Path, column: str) -> None:
    membership = mid.membership("ann", tmp_path)
    _receipted_outbox(mid, membership, 2).close()
    db = sqlite3.connect(membership.outbox_path)
    if column == "note":
        size, note = db.execute("SELECT size, note FROM checkpoints ORDER BY size LIMIT 1").fetchone()
        changed = bytearray(note)
        changed[-5] ^= 0x01  # the MID's signature over it
        db.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (bytes(changed), size))
    else:
        (value,) = db.execute(f"SELECT {column} FROM receipts WHERE seq = 1").fetchone()
        changed = bytearray(value)
        changed[len(changed) // 2] ^= 0x01
        db.execute(f"UPDATE receipts SET {column} = ? WHERE seq = 1", (bytes(changed),))
    db.commit()
    db.close()
    report = verify_membership_receipts(membership, 1 << 20, against_witnesses=False)
    assert not report.ok
    assert [c.status for c in report.checks] == [ReceiptStatus.REFUSED, ReceiptStatus.PROVEN]


def test_receipts_kept_before_envelopes_were_are_listed_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE receipts (seq INTEGER PRIMARY KEY, leaf_index INTEGER NOT NULL, tree_size INTEGER NOT NULL,"
        " envelope_sha256 TEXT NOT NULL, spool_name TEXT UNIQUE, received_ms INTEGER NOT NULL);"
        "INSERT INTO receipts VALUES (4, 10, 11, 'ab', NULL, 5);"
    )
    old.close()
    outbox = Outbox(path, 1 << 20)  # the columns this version keeps are added
    kept = outbox.kept_receipts()
    assert [(r.seq, r.envelope, r.path) for r in kept] == [(4, None, None)]
    checks, _ = check_offline(kept, SignerKey.generate("d").verifier, SignerKey.generate("m").verifier)
    assert [c.status for c in checks] == [ReceiptStatus.NOT_KEPT]
    outbox.close()


def test_the_member_commands_print_only_what_verified(mid: Mid, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edge.agent.membership import save_membership
    from midgate_cli import app
    from protocol.identity import save_signer_key

    data_dir = tmp_path / "agent-ann"
    membership = mid.membership("ann", tmp_path)
    directory = data_dir / "mids" / MID
    save_membership(directory, membership.record)
    save_signer_key(directory / "device.key", membership.key)
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{data_dir}"\n')
    mid.cosign("ann", "bob")
    runner = CliRunner()

    shown = runner.invoke(app, ["agent", "statement", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    assert "job job-1: 13333 EUR" in shown.output and "Total: 15733 EUR minor units" in shown.output
    receipts = runner.invoke(app, ["agent", "receipts", "--verify", "--config", str(config)])
    assert receipts.exit_code == 0 and "no receipts yet" in receipts.output, receipts.output
    assert (
        runner.invoke(
            app, ["agent", "statement", "--since", "2030-01-01", "--until", "2029-01-01", "--config", str(config)]
        ).exit_code
        == 2
    )

    index = next(i for i, data in mid.ledger.leaves(0, mid.ledger.size) if b"job-1.settlement" in data)
    db = sqlite3.connect(tmp_path / "ledger.sqlite")
    (data,) = db.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()
    db.execute("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data).replace(b"13333", b"23333"), index))
    db.commit()
    db.close()
    refused = runner.invoke(app, ["agent", "statement", "--config", str(config)])
    assert refused.exit_code == 1
    assert "statement refused: root_mismatch" in refused.output and f"leaf_index={index}" in refused.output
    assert "Total" not in refused.output
