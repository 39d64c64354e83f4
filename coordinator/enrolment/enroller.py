"""Turning a signed invite and a self-signed EnrolmentRequest into a device membership.

Steps, each a typed rejection on failure and none leaving a trace when it fails: size -> the request is signed by
the key it enrols (proof of possession), which is named after the device -> it names this MID -> the invite token
verifies under the MID key and has not expired -> the registry redeems the invite exactly once and registers the
device with fresh broker credentials -> the request envelope is appended to the ledger as an `enrol` leaf (owed in
the registry's redeem transaction, so a crash before the append is repaired by `recover` at the next start) -> the
grant carries the signed response, the leaf's receipt and the credentials. The same signed request sent again (the
agent lost the answer) gets the same device and leaf with a fresh broker password. The broker learns the new login
through `on_enrolled` (password file + reload). A request with a `flower_key` (checked to be a P-256 OpenSSH key
before anything is written) also registers that key with the MID's SuperLink once per device; the node id is stored
with the device and returned.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.broker.passwords import hash_password, new_password
from coordinator.ledger.store import LedgerStore
from coordinator.registry.ledger_records import log_enrolments
from coordinator.registry.store import Device, Registry
from protocol.checkpoint import Receipt as TlogProof
from protocol.enrolment import BrokerCredentials, EnrolmentGrant, InviteClaim, open_invite, sign_invite
from protocol.envelope import envelope_digest
from protocol.errors import BadKeyError, InviteInvalidError, InviteUsedError, TooLargeError
from protocol.identity import SignerKey, VerifierKey
from protocol.messages import EnrolmentResponse, Receipt, open_enrolment_request


class FlowerRegistrar(Protocol):
    """The MID's SuperLink as enrolment sees it (coordinator.federation.mid_superlink.MidSuperLink)."""

    @property
    def public_address(self) -> str: ...

    @property
    def ca_pem(self) -> str: ...

    def register_node(self, public_key_openssh: str) -> int: ...


def check_flower_key(text: str) -> None:
    """Flower's SuperNode authentication takes P-256 keys; anything else is refused before the invite is used."""
    try:
        key = serialization.load_ssh_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BadKeyError("flower_key is not an OpenSSH public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise BadKeyError("flower_key is not a P-256 key")


def issue_invite(registry: Registry, mid_key: SignerKey, mid: str, member: str, now_ms: int, ttl_s: int) -> str:
    """Record a new invite for `member` and return the token to hand to them."""
    claim, token = sign_invite(mid_key, mid, now_ms + ttl_s * 1000)
    registry.add_invite(claim.invite_id, member, now_ms, claim.expires_ms)
    return token


class Enroller:
    """Thread-safe: the HTTP endpoint calls it from worker threads; one enrolment at a time."""

    def __init__(
        self,
        mid: str,
        registry: Registry,
        ledger: LedgerStore,
        mid_key: SignerKey,
        broker: Callable[[str, str], BrokerCredentials],
        on_enrolled: Callable[[Device], None],
        max_body_bytes: int,
        federation: FlowerRegistrar | None = None,
    ) -> None:
        self.mid = mid
        self.federation = federation
        self.registry = registry
        self.ledger = ledger
        self.mid_key = mid_key
        self._broker = broker
        self._on_enrolled = on_enrolled
        self.max_body_bytes = max_body_bytes
        self._lock = threading.Lock()

    @property
    def mid_verifier(self) -> VerifierKey:
        return self.mid_key.verifier

    def recover(self) -> list[int]:
        """Log enrolments a crash left redeemed but unlogged (call before serving); returns their leaf indices."""
        with self._lock:
            return log_enrolments(self.registry, self.ledger)

    def enrol(self, body: bytes, now_ms: int) -> EnrolmentGrant:
        if len(body) > self.max_body_bytes:
            raise TooLargeError("enrolment request too large", limit=self.max_body_bytes, found=len(body))
        verified, request = open_enrolment_request(body)
        if verified.signer.name != request.device:
            # Witness lists and cosignature lines name a device by its key's name (docs/protocol.md, "Identities"); a
            # key named otherwise would misname the device there, or (not an id) break the witness list for everyone.
            raise BadKeyError("device_key must be named after the device", device=request.device)
        if request.mid != self.mid:
            raise InviteInvalidError("request names another MID", expected=self.mid, found=request.mid)
        claim: InviteClaim = open_invite(request.invite_token, self.mid, self.mid_verifier, now_ms)
        if request.flower_key:
            check_flower_key(request.flower_key)
        password = new_password()
        with self._lock:
            try:
                device = self.registry.redeem_invite(
                    claim.invite_id, now_ms, request.device, verified.signer, hash_password(password), request=body
                )
            except InviteUsedError:
                device = self._same_request_again(claim.invite_id, body, hash_password(password))
            index = self.registry.logged_index(device.device_id, "enrol")
            if index is None:
                # Registry first, then ledger: a crash in between leaves the enrolment owed, and `recover` logs it.
                # This also logs any other enrolment an earlier failed append left owed.
                log_enrolments(self.registry, self.ledger)
                index = self.registry.logged_index(device.device_id, "enrol")
                assert index is not None
            size = self.ledger.size
            proof = TlogProof(index, tuple(self.ledger.inclusion_proof(index, size)), self.ledger.checkpoint(size))
            node_id = self._flower_node(device, request.flower_key, now_ms)
        self._on_enrolled(device)
        response = EnrolmentResponse(
            mid=self.mid,
            device=device.device_id,
            accepted=True,
            member=device.member_id,
            mid_key=self.mid_verifier.text(),
            request_seq=request.seq,
            issued_ms=now_ms,
            flower_node_id=node_id,
            superlink=self.federation.public_address if node_id and self.federation else "",
        ).seal(self.mid_key)
        receipt = Receipt(
            device_key_id=verified.key_id,
            seq=request.seq,
            envelope_sha256=envelope_digest(body).hex(),
            leaf_index=index,
            tlog_proof=proof.text(),
            issued_ms=now_ms,
        ).seal(self.mid_key)
        return EnrolmentGrant(
            response=base64.b64encode(response).decode(),
            receipt=base64.b64encode(receipt).decode(),
            broker=self._broker(device.device_id, password),
            superlink_ca_pem=self.federation.ca_pem if node_id and self.federation else "",
        )

    def _flower_node(self, device: Device, flower_key: str, now_ms: int) -> int:
        """The device's SuperLink node id, registering its key the first time (a resent request finds it stored).
        A registration that fails leaves the enrolment answered with an error; the agent's resent request retries."""
        if not flower_key or self.federation is None:
            return 0
        known = self.registry.flower_node(device.device_id)
        if known is not None:
            return known.node_id
        node_id = self.federation.register_node(flower_key)
        self.registry.add_flower_node(device.device_id, node_id, flower_key, now_ms)
        return node_id

    def _same_request_again(self, invite_id: str, body: bytes, password_hash: str) -> Device:
        """An agent whose grant was lost (crash, timeout) sends the very same signed request again: answer it again
        with a fresh broker password. Anything else under a used invite is `invite_used`."""
        invite = self.registry.invite(invite_id)
        device = None if invite is None or invite.device_id is None else self.registry.device(invite.device_id)
        if device is None or device.revoked or self.registry.enrol_request(device.device_id) != body:
            raise InviteUsedError("invite already used", invite_id=invite_id)
        self.registry.set_broker_password(device.device_id, password_hash)
        return device
