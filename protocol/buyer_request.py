"""Buyer API request signatures: every request to `/v1/jobs...` is signed by the buyer's Ed25519 key.

The signature is a DSSE envelope (protocol.envelope) whose payload is a `BuyerRequestStatement`: the request's method,
its path with the raw query string, the SHA-256 of its exact body bytes, the time it was signed and a fresh nonce. The
envelope travels base64-encoded in the `Midgate-Signature` header, so a client needs nothing but DSSE and SHA-256
(docs/protocol.md, "Buyer request signatures"). The coordinator verifies the envelope first, parses the statement
second, and only then compares it with the request it came with: a signature lifted onto another method, path or body
is refused `bad_signature`; an old one `stale_request`; a nonce seen before `replayed` (the caller keeps the nonces).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import StringConstraints

from protocol.envelope import decode, open_envelope, peek_envelope
from protocol.errors import BadSignatureError, MalformedError, StaleRequestError, TooLargeError, UnsignedError
from protocol.identity import SignerKey, VerifierKey
from protocol.messages import Ident, Sha256Hex, TimeMs, WireMessage

SIGNATURE_HEADER = "Midgate-Signature"
MAX_SIGNATURE_HEADER = 4096
MAX_SKEW_MS = 300_000
"""A statement signed more than 5 minutes before or after the coordinator's clock is stale."""

Nonce = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,64}$")]
HttpMethod = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3,7}$")]
RequestTarget = Annotated[str, StringConstraints(pattern=r"^/[\x21-\x7e]{0,2047}$")]


class BuyerRequestStatement(WireMessage):
    """What a buyer signs for one request. `target` is the path and, when there is one, `?` and the raw query."""

    PAYLOAD_TYPE: ClassVar[str] = "application/vnd.midgate.buyer-request.v1+json"
    buyer: Ident
    method: HttpMethod
    target: RequestTarget
    body_sha256: Sha256Hex
    issued_ms: TimeMs
    nonce: Nonce


@dataclass(frozen=True)
class SignedRequest:
    """A request whose signature verified and covers it: who sent it and the nonce the caller must not see twice."""

    buyer: str
    key: VerifierKey
    statement: BuyerRequestStatement
    envelope: bytes


def sign_request(key: SignerKey, buyer: str, method: str, target: str, body: bytes, now_ms: int) -> dict[str, str]:
    """The headers that sign one request (`target`: path plus `?query` exactly as sent)."""
    statement = BuyerRequestStatement(
        buyer=buyer,
        method=method.upper(),
        target=target,
        body_sha256=hashlib.sha256(body).hexdigest(),
        issued_ms=now_ms,
        nonce=secrets.token_urlsafe(18),
    )
    return {SIGNATURE_HEADER: base64.b64encode(statement.seal(key)).decode("ascii")}


def signature_key_ids(header: str | None) -> tuple[bytes, tuple[str, ...]]:
    """The envelope in a `Midgate-Signature` header and its (unverified) key ids: which buyer key to look up."""
    if header is None or not header.strip():
        raise UnsignedError(f"no {SIGNATURE_HEADER} header: every buyer API request is signed")
    if len(header) > MAX_SIGNATURE_HEADER:
        raise TooLargeError("signature header too large", limit=MAX_SIGNATURE_HEADER, found=len(header))
    try:
        envelope = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"{SIGNATURE_HEADER} is not base64") from None
    return envelope, peek_envelope(envelope)[2]


def verify_request(
    envelope: bytes, buyer: str, key: VerifierKey, method: str, target: str, body: bytes, now_ms: int
) -> SignedRequest:
    """Verify the signature envelope with `key` (the key the MID registered for `buyer`, looked up by the envelope's
    key id) and that its statement names `buyer` and covers this method, target and body, signed within MAX_SKEW_MS of
    `now_ms`."""
    verified = open_envelope(envelope, {key.key_id.hex(): key}, BuyerRequestStatement.PAYLOAD_TYPE)
    statement = decode(verified, BuyerRequestStatement)
    if statement.buyer != buyer:
        raise BadSignatureError(
            "the statement names another buyer than the key's", expected=buyer, found=statement.buyer
        )
    found = (statement.method, statement.target, statement.body_sha256)
    expected = (method.upper(), target, hashlib.sha256(body).hexdigest())
    for what, want, got in zip(("method", "target", "body_sha256"), expected, found, strict=True):
        if want != got:
            raise BadSignatureError(f"the signature does not cover this request's {what}", expected=want, found=got)
    if abs(now_ms - statement.issued_ms) > MAX_SKEW_MS:
        raise StaleRequestError(
            "request signed too long ago (or ahead)", issued_ms=statement.issued_ms, now_ms=now_ms, max_ms=MAX_SKEW_MS
        )
    return SignedRequest(statement.buyer, verified.signer, statement, envelope)
