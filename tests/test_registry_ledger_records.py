"""Registry facts reach the ledger: key revocations as MID-signed leaves, enrolments even across a crash between the
registry's redeem and the ledger append. Real SQLite files and real Ed25519 throughout."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import pytest

from coordinator.enrolment.enroller import Enroller, issue_invite
from coordinator.ingest.pipeline import IngestPipeline
from coordinator.ledger.dedup import DedupIndex
from coordinator.ledger.store import AppendResult, LedgerStore
from coordinator.mid_key import mid_key_name
from coordinator.registry.store import Device, Registry
from edge.agent.enrolment import PENDING_REQUEST, pending_enrolment_request
from protocol.checkpoint import verify_receipt
from protocol.enrolment import BrokerCredentials
from protocol.envelope import decode, open_envelope
from protocol.errors import BadKeyError, InviteUsedError
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind, decode_leaf
from protocol.messages import EnrolmentRequest, KeyRevocation, Receipt

MID = "riverside"
NOW = 1_790_000_000_000


def _leaves(ledger: LedgerStore, kind: LeafKind) -> list[tuple[int, bytes]]:
    found = []
    for index, data in ledger.leaves(0, ledger.size):
        leaf = decode_leaf(data)
        if leaf.kind is kind:
            found.append((index, leaf.signed))
    return found


class Coordinator:
    """The coordinator's stores for one MID, opened as `coordinator serve` opens them."""

    def __init__(self, root: Path, mid_key: SignerKey, ledger_type: type[LedgerStore] = LedgerStore) -> None:
        self.mid_key = mid_key
        self.registry = Registry(root / "registry.sqlite")
        self.ledger = ledger_type.open(root / "ledger.sqlite", mid_key)
        self.dedup = DedupIndex(root / "ingest.sqlite")

    def pipeline(self) -> IngestPipeline:
        return IngestPipeline(MID, self.registry, self.ledger, self.dedup, self.mid_key, 64 * 1024, 10.0, 100)

    def enroller(self) -> Enroller:
        def credentials(device: str, password: str) -> BrokerCredentials:
            return BrokerCredentials(
                host="127.0.0.1", port=1883, tls=False, ca_pem="", username=device, password=password
            )

        def enrolled(device: Device) -> None:
            pass

        return Enroller(MID, self.registry, self.ledger, self.mid_key, credentials, enrolled, 64 * 1024)

    def close(self) -> None:
        self.dedup.close()
        self.registry.close()
        self.ledger.close()


def _request(token: str, device: str = "d-1") -> tuple[SignerKey, bytes]:
    key = SignerKey.generate(device)
    request = EnrolmentRequest(
        mid=MID, device=device, device_key=key.verifier.text(), invite_token=token, seq=0, device_time_ms=NOW
    )
    return key, request.seal(key)


def test_revocation_is_logged_once_as_a_mid_signed_leaf(tmp_path: Path) -> None:
    c = Coordinator(tmp_path, SignerKey.generate(mid_key_name(MID)))
    token = issue_invite(c.registry, c.mid_key, MID, "alice", NOW, 3600)
    key, body = _request(token)
    c.enroller().enrol(body, NOW)
    pipeline = c.pipeline()
    assert _leaves(c.ledger, LeafKind.KEY_REVOKE) == []
    # `midgate coordinator revoke` writes only the registry (another process); the ledger's writer logs it.
    other = Registry(tmp_path / "registry.sqlite")
    assert other.revoke("d-1", NOW + 5)
    other.close()
    pipeline.refresh_registry()
    pipeline.refresh_registry()
    ((index, signed),) = _leaves(c.ledger, LeafKind.KEY_REVOKE)
    verified = open_envelope(signed, {c.mid_key.key_id.hex(): c.mid_key.verifier}, KeyRevocation.PAYLOAD_TYPE)
    revocation = decode(verified, KeyRevocation)
    assert (revocation.mid, revocation.device, revocation.revoked_ms) == (MID, "d-1", NOW + 5)
    assert revocation.device_key == key.verifier.text()
    assert c.registry.logged_index("d-1", "revoke") == index
    c.close()


def test_revocation_made_while_the_coordinator_was_down_is_logged_at_its_start(tmp_path: Path) -> None:
    mid_key = SignerKey.generate(mid_key_name(MID))
    c = Coordinator(tmp_path, mid_key)
    token = issue_invite(c.registry, mid_key, MID, "alice", NOW, 3600)
    c.enroller().enrol(_request(token)[1], NOW)
    assert c.registry.revoke("d-1", NOW + 5)
    c.close()
    restarted = Coordinator(tmp_path, mid_key)
    restarted.pipeline()
    assert len(_leaves(restarted.ledger, LeafKind.KEY_REVOKE)) == 1
    restarted.close()


class CrashingLedger(LedgerStore):
    """A real ledger whose next append dies like a process killed before its commit."""

    crash_next = False

    def append(self, leaves: Sequence[bytes]) -> AppendResult:
        if CrashingLedger.crash_next:
            CrashingLedger.crash_next = False
            raise OSError("simulated crash before the ledger commit")
        return super().append(leaves)


def test_enrolment_interrupted_between_registry_and_ledger_is_recovered(tmp_path: Path) -> None:
    mid_key = SignerKey.generate(mid_key_name(MID))
    c = Coordinator(tmp_path, mid_key, CrashingLedger)
    token = issue_invite(c.registry, mid_key, MID, "alice", NOW, 3600)
    key, body = _request(token)
    CrashingLedger.crash_next = True
    with pytest.raises(OSError):
        c.enroller().enrol(body, NOW)
    # The invite is redeemed and the device registered, but the ledger has nothing: the enrolment is owed.
    assert [d.device_id for d in c.registry.devices()] == ["d-1"] and c.ledger.size == 0
    c.close()

    restarted = Coordinator(tmp_path, mid_key)
    enroller = restarted.enroller()
    assert enroller.recover() == [0]
    assert _leaves(restarted.ledger, LeafKind.ENROL) == [(0, body)]
    assert enroller.recover() == []

    # The agent, which never got its answer, sends the very same request again and gets a grant for that leaf.
    grant = enroller.enrol(body, NOW + 10)
    receipt_env = base64.b64decode(grant.receipt)
    verified = open_envelope(receipt_env, {mid_key.key_id.hex(): mid_key.verifier}, Receipt.PAYLOAD_TYPE)
    receipt = decode(verified, Receipt)
    proven = verify_receipt(receipt.tlog_proof, Leaf(LeafKind.ENROL, body).encode(), mid_key.verifier)
    assert (receipt.leaf_index, proven.index, restarted.ledger.size) == (0, 0, 1)
    assert grant.broker.username == "d-1" and grant.broker.password

    # Anyone else under the used invite is refused, and nothing is logged.
    with pytest.raises(InviteUsedError):
        enroller.enrol(_request(token, "d-2")[1], NOW + 20)
    assert restarted.ledger.size == 1 and key.verifier == restarted.registry.devices()[0].verifier
    restarted.close()


def test_agent_retry_after_a_lost_answer_sends_the_same_request_and_gets_the_same_leaf(tmp_path: Path) -> None:
    mid_key = SignerKey.generate(mid_key_name(MID))
    c = Coordinator(tmp_path / "coordinator", mid_key)
    token = issue_invite(c.registry, mid_key, MID, "alice", NOW, 3600)
    membership_dir = tmp_path / "agent" / "mids" / MID
    key, body = pending_enrolment_request(membership_dir, MID, token, NOW)
    assert oct((membership_dir / PENDING_REQUEST).stat().st_mode & 0o777) == "0o600"
    first = c.enroller().enrol(body, NOW)  # ... and its answer is lost on the way back
    again_key, again_body = pending_enrolment_request(membership_dir, MID, token, NOW + 1000)
    assert (again_key.text(), again_body) == (key.text(), body)
    second = c.enroller().enrol(again_body, NOW + 1000)
    assert second.broker.password != first.broker.password and c.ledger.size == 1
    # A new invite token means a new request (and key).
    other_token = issue_invite(c.registry, mid_key, MID, "alice", NOW, 3600)
    other_key, _ = pending_enrolment_request(membership_dir, MID, other_token, NOW)
    assert other_key.text() != key.text()
    c.close()


def test_an_enrolment_after_a_failed_append_logs_both(tmp_path: Path) -> None:
    mid_key = SignerKey.generate(mid_key_name(MID))
    c = Coordinator(tmp_path, mid_key, CrashingLedger)
    first = _request(issue_invite(c.registry, mid_key, MID, "alice", NOW, 3600), "d-1")[1]
    second = _request(issue_invite(c.registry, mid_key, MID, "bob", NOW, 3600), "d-2")[1]
    enroller = c.enroller()
    CrashingLedger.crash_next = True
    with pytest.raises(OSError):
        enroller.enrol(first, NOW)
    grant = enroller.enrol(second, NOW + 1)
    assert [signed for _, signed in _leaves(c.ledger, LeafKind.ENROL)] == [first, second]
    receipt = decode(
        open_envelope(base64.b64decode(grant.receipt), {mid_key.key_id.hex(): mid_key.verifier}, Receipt.PAYLOAD_TYPE),
        Receipt,
    )
    assert receipt.leaf_index == 1
    c.close()


def test_a_device_key_not_named_after_its_device_is_refused_and_the_invite_stays_unused(tmp_path: Path) -> None:
    """docs/protocol.md "Identities": witness lists and cosignature lines name a device by its key's name."""
    mid_key = SignerKey.generate(mid_key_name(MID))
    c = Coordinator(tmp_path, mid_key)
    token = issue_invite(c.registry, mid_key, MID, "alice", NOW, 3600)
    for name in ("d-2", "Not/An-Id"):
        key = SignerKey.generate(name)
        request = EnrolmentRequest(
            mid=MID, device="d-1", device_key=key.verifier.text(), invite_token=token, seq=0, device_time_ms=NOW
        )
        with pytest.raises(BadKeyError):
            c.enroller().enrol(request.seal(key), NOW)
    assert c.registry.devices() == [] and c.ledger.size == 0
    c.enroller().enrol(_request(token, "d-1")[1], NOW)  # the invite was not used up
    assert [d.device_id for d in c.registry.devices()] == ["d-1"]
    c.close()
