"""Invites and the enrolment grant: how a device joins a MID before it has any broker credentials.

An invite token is what the operator hands a member (text, QR code): base64url of

    invite id (12 random bytes) || expiry (u48 big-endian, ms since epoch UTC) || Ed25519 signature (64 bytes)

signed by the MID key over "midgate-invite-v1\\n" || mid || "\\n" || id || expiry, so a token is bound to one MID,
cannot be forged or have its expiry stretched, and fits the 16..128 character `invite_token` of an EnrolmentRequest.
Single use is the registry's business, not the token's.

The device POSTs its self-signed EnrolmentRequest envelope to the MID's enrolment endpoint (docs/messaging.md) and
gets an `EnrolmentGrant`: the signed EnrolmentResponse, the receipt of the enrol leaf, and its broker credentials.
The credentials are not inside a signed message because they are a secret meant for this one device only.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from protocol.errors import InviteExpiredError, InviteInvalidError
from protocol.identity import SIGNATURE_SIZE, SignerKey, VerifierKey
from protocol.topics import check_id

INVITE_ID_SIZE = 12
_EXPIRY_SIZE = 6
_TOKEN_SIZE = INVITE_ID_SIZE + _EXPIRY_SIZE + SIGNATURE_SIZE
_DOMAIN = b"midgate-invite-v1\n"
MAX_GRANT_SIZE = 64 * 1024


@dataclass(frozen=True)
class InviteClaim:
    """What a verified invite token says: which MID, which invite, valid until when."""

    mid: str
    invite_id: str
    expires_ms: int


def _message(mid: str, invite_id: bytes, expiry: bytes) -> bytes:
    return _DOMAIN + mid.encode() + b"\n" + invite_id + expiry


def sign_invite(key: SignerKey, mid: str, expires_ms: int) -> tuple[InviteClaim, str]:
    """A new invite for `mid`, valid until `expires_ms`; returns its claim and the token to hand out."""
    check_id(mid, "mid")
    if not 0 < expires_ms < 1 << (8 * _EXPIRY_SIZE):
        raise InviteInvalidError("expiry out of range", expires_ms=expires_ms)
    invite_id = secrets.token_bytes(INVITE_ID_SIZE)
    expiry = expires_ms.to_bytes(_EXPIRY_SIZE, "big")
    signature = key._sign(_message(mid, invite_id, expiry))
    token = base64.urlsafe_b64encode(invite_id + expiry + signature).decode().rstrip("=")
    return InviteClaim(mid, invite_id.hex(), expires_ms), token


def open_invite(token: str, mid: str, mid_key: VerifierKey, now_ms: int) -> InviteClaim:
    """Verify an invite token for `mid` under `mid_key`; a wrong MID or key is `invite_invalid`, late is expired."""
    if not isinstance(token, str) or len(token) > 128:
        raise InviteInvalidError("invite token must be at most 128 characters")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise InviteInvalidError("invite token is not base64url") from None
    if len(raw) != _TOKEN_SIZE:
        raise InviteInvalidError("invite token has the wrong length", expected=_TOKEN_SIZE, found=len(raw))
    invite_id, expiry, signature = raw[:INVITE_ID_SIZE], raw[INVITE_ID_SIZE:-SIGNATURE_SIZE], raw[-SIGNATURE_SIZE:]
    if not mid_key.verifies(_message(mid, invite_id, expiry), signature):
        raise InviteInvalidError("invite is not signed by this MID's key", mid=mid, key=mid_key.name)
    expires_ms = int.from_bytes(expiry, "big")
    if now_ms >= expires_ms:
        raise InviteExpiredError("invite expired", invite_id=invite_id.hex(), expires_ms=expires_ms, now_ms=now_ms)
    return InviteClaim(mid, invite_id.hex(), expires_ms)


class BrokerCredentials(BaseModel):
    """Where and as whom a device connects to the MID's broker. `ca_pem` empty: plain TCP (loopback demos only)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    host: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)]
    tls: bool
    ca_pem: Annotated[str, StringConstraints(max_length=16 * 1024)] = ""
    username: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    password: Annotated[str, StringConstraints(min_length=16, max_length=128)]


class EnrolmentGrant(BaseModel):
    """The enrolment endpoint's answer: base64 of the signed EnrolmentResponse and Receipt envelopes + credentials."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    response: Annotated[str, StringConstraints(max_length=32 * 1024)]
    receipt: Annotated[str, StringConstraints(max_length=32 * 1024)]
    broker: BrokerCredentials
    superlink_ca_pem: Annotated[str, StringConstraints(max_length=16 * 1024)] = ""
    """The CA the SuperLink's certificate chains to (the MID CA); empty when the MID runs no SuperLink."""


class EnrolmentRefusal(BaseModel):
    """The endpoint's answer to a refused enrolment: the stable reason code and a human message."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    reason: Annotated[str, StringConstraints(max_length=64)]
    message: Annotated[str, StringConstraints(max_length=1024)]
