"""`midgate agent enrol --mid URL --invite TOKEN`: join a MID with a fresh key made for that MID only.

1. GET {URL}/v1/info -> the MID id and its key. Not trusted yet: the invite token, which reached the member out of
   band, must verify under that key for that MID, which binds the endpoint to whoever issued the invite.
2. Make a new Ed25519 key for this MID (never reused across MIDs), sign an EnrolmentRequest with it (proof of
   possession) and POST it to {URL}/v1/enrol.
3. Check the grant: the response is signed by the MID key and names this device; the enrol receipt's inclusion proof
   verifies for the exact request we sent. Only then are the credentials and CA written (0600). The key and the
   signed request are written (0600) before the POST, so a retry after a lost answer sends the same request.

The request also carries the public half of a fresh P-256 Flower SuperNode key for this MID (edge.federated.supernode,
private key 0600 in the membership folder); the MID registers it with its SuperLink and answers with the node id.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import urllib.error
import urllib.request
from pathlib import Path

from edge.agent.config import AgentSettings
from edge.agent.ledger_view import LedgerView
from edge.agent.membership import FLOWER_KEY_DIR, MembershipRecord, save_membership
from edge.agent.outbox import Outbox
from edge.federated.supernode import generate_node_key
from protocol.enrolment import EnrolmentGrant, EnrolmentRefusal, open_invite
from protocol.envelope import decode, open_envelope
from protocol.errors import (
    InviteExpiredError,
    InviteInvalidError,
    InviteUsedError,
    MalformedError,
    ProtocolError,
    Reason,
    TooLargeError,
)
from protocol.identity import SignerKey, VerifierKey, load_signer_key, save_signer_key
from protocol.leaves import LeafKind
from protocol.messages import EnrolmentRequest, EnrolmentResponse, open_enrolment_request
from protocol.private_files import private_dir, private_file
from protocol.topics import UpKind, check_id

MAX_RESPONSE = 128 * 1024
AGENT_VERSION = "midgate-agent/0.1"


class EnrolmentRefusedError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


_REFUSALS: dict[str, type[ProtocolError]] = {
    Reason.INVITE_EXPIRED: InviteExpiredError,
    Reason.INVITE_USED: InviteUsedError,
    Reason.INVITE_INVALID: InviteInvalidError,
}


def _http(url: str, body: bytes | None = None, timeout_s: float = 30.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if body is not None:
        request.add_header("Content-Type", "application/vnd.dsse.envelope.v1+json")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, data = response.status, response.read(MAX_RESPONSE + 1)
    except urllib.error.HTTPError as exc:
        status, data = exc.code, exc.read(MAX_RESPONSE + 1)
    if len(data) > MAX_RESPONSE:
        raise TooLargeError("enrolment endpoint answer too large", limit=MAX_RESPONSE)
    return status, data


def enrol(settings: AgentSettings, url: str, token: str, now_ms: int | None = None) -> MembershipRecord:
    """Enrol this agent with the MID at `url` using `token`; returns the stored membership."""
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    base = url.rstrip("/")
    status, data = _http(base + "/v1/info")
    if status != 200:
        raise MalformedError("enrolment endpoint did not answer /v1/info", status=status)
    info = json.loads(data)
    mid = check_id(str(info["mid"]), "mid")
    mid_key = VerifierKey.parse(str(info["mid_key"]))
    directory = settings.membership_dir(mid)
    if (directory / "membership.json").exists():
        raise InviteUsedError("this agent is already a member of this MID", mid=mid)
    open_invite(token, mid, mid_key, now_ms)

    key, envelope = pending_enrolment_request(directory, mid, token, now_ms)
    device = key.name
    status, data = _http(base + "/v1/enrol", envelope)
    if status != 200:
        refusal = EnrolmentRefusal.model_validate_json(data)
        error = _REFUSALS.get(refusal.reason)
        if error is not None:
            raise error(refusal.message)
        raise EnrolmentRefusedError(refusal.reason, refusal.message)
    grant = EnrolmentGrant.model_validate_json(data)
    trusted_keys = {mid_key.key_id.hex(): mid_key}
    response = decode(
        open_envelope(base64.b64decode(grant.response), trusted_keys, EnrolmentResponse.PAYLOAD_TYPE), EnrolmentResponse
    )
    if not response.accepted or response.device != device or response.mid != mid or response.member is None:
        raise MalformedError("enrolment response does not accept this device", device=device, found=response.device)
    if response.mid_key != mid_key.text() or grant.broker.username != device:
        raise MalformedError("enrolment response names another key or login")

    view = LedgerView(mid_key, key.key_id.hex(), lambda old, new: [], None)
    settled = view.settle(base64.b64decode(grant.receipt), envelope, LeafKind.ENROL, 0)

    record = MembershipRecord(
        mid=mid,
        device=device,
        member=response.member,
        mid_key=mid_key.text(),
        enrolment_url=base,
        broker=grant.broker,
        enrolled_ms=now_ms,
        flower_node_id=response.flower_node_id,
        superlink=response.superlink,
        superlink_ca_pem=grant.superlink_ca_pem,
    )
    outbox = Outbox(private_file(directory / "outbox.sqlite"), settings.outbox_max_bytes)
    try:
        assert view.trusted_note is not None
        outbox.set_meta("trusted_checkpoint", view.trusted_note)
        outbox.set_meta("enrol_leaf_index", str(settled.leaf_index).encode())
        outbox.keep_receipt(settled, UpKind.ENROL.value, envelope, now_ms)
    finally:
        outbox.close()
    save_membership(directory, record)
    (directory / PENDING_REQUEST).unlink(missing_ok=True)
    return record


PENDING_REQUEST = "enrol-request.dsse"


def pending_enrolment_request(directory: Path, mid: str, token: str, now_ms: int) -> tuple[SignerKey, bytes]:
    """The key and signed EnrolmentRequest for this invite, made once and kept (0600) until the grant is stored.

    A retry after a lost answer (timeout, crash, coordinator restart) sends the very same request, which the
    coordinator answers again; a fresh key would find the invite already used by the first one.
    """
    key_file, request_file = directory / "device.key", directory / PENDING_REQUEST
    if key_file.exists() and request_file.exists():
        key = load_signer_key(key_file)
        envelope = request_file.read_bytes()
        _, pending = open_enrolment_request(envelope)
        if pending.invite_token == token and pending.mid == mid and pending.device_key == key.verifier.text():
            return key, envelope
    device = "d-" + secrets.token_hex(8)
    key = SignerKey.generate(device)
    private_dir(directory)  # the data folder and the membership's: keys, the grant's password, the outbox
    flower_key = generate_node_key(directory / FLOWER_KEY_DIR).public_key.read_text().strip()
    request = EnrolmentRequest(
        mid=mid,
        device=device,
        device_key=key.verifier.text(),
        invite_token=token,
        seq=0,
        device_time_ms=now_ms,
        agent_version=AGENT_VERSION,
        flower_key=flower_key,
    )
    envelope = request.seal(key)
    save_signer_key(key_file, key)
    tmp = request_file.with_suffix(".tmp")
    tmp.write_bytes(envelope)
    tmp.chmod(0o600)
    tmp.replace(request_file)
    return key, envelope


def spool_dir_for(settings: AgentSettings, mid: str) -> Path:
    return settings.spool_root / mid
