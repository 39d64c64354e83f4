"""DSSE signed envelopes (https://github.com/secure-systems-lab/dsse, envelope.md and protocol.md).

    {"payloadType": "<type>", "payload": "<base64(bytes)>", "signatures": [{"keyid": "<hex>", "sig": "<base64>"}]}

Each signature is Ed25519 over PAE(type, body) = "DSSEv1 <len(type)> <type> <len(body)> <body>". The key id is the
hex of the signer's 4-byte C2SP signed-note key id (protocol.identity).

`seal` and `open_envelope` are the only ways in and out. `open_envelope` checks the size before parsing, parses the
wrapper with plain `json` (pydantic would cost a measurable share of the verify budget; bench/protocol_bench.py) but
strictly, verifies the signature, and only then compares the payloadType: a `wrong_type` rejection therefore always
names an authentic message sent to the wrong place, never a forgery. The payload itself is parsed only by `decode`,
after verification, and keeps the exact bytes that were signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from protocol.errors import (
    BadKeyError,
    BadSignatureError,
    MalformedError,
    TooLargeError,
    UnknownKeyError,
    WrongTypeError,
)
from protocol.identity import KEY_ID_SIZE, SIGNATURE_SIZE, SignerKey, VerifierKey

MAX_ENVELOPE_SIZE = 64 * 1024
MAX_SIGNATURES = 4
MAX_PAYLOAD_TYPE_LEN = 128
_ENVELOPE_KEYS = frozenset(("payloadType", "payload", "signatures"))
_SIGNATURE_KEYS = frozenset(("keyid", "sig"))
# Printable ASCII without space: a payloadType is a media type, and this keeps PAE lengths equal to character counts.
_PAYLOAD_TYPE = re.compile(f"[\\x21-\\x7e]{{1,{MAX_PAYLOAD_TYPE_LEN}}}")
_KEY_ID_HEX = re.compile(f"[0-9a-f]{{{2 * KEY_ID_SIZE}}}")

M = TypeVar("M", bound=BaseModel)


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding; lengths are ASCII decimal byte counts."""
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


class KeyRing(Mapping[str, VerifierKey]):
    """Trusted verifier keys by hex key id. Two different keys with the same 4-byte id are refused, not shadowed."""

    def __init__(self, keys: Iterable[VerifierKey] = ()) -> None:
        self._keys: dict[str, VerifierKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: VerifierKey) -> None:
        kid = key.key_id.hex()
        present = self._keys.get(kid)
        if present is not None and present != key:
            raise BadKeyError("a different key with the same key id is already trusted", key_id=kid, name=key.name)
        self._keys[kid] = key

    def remove(self, key: VerifierKey) -> None:
        self._keys.pop(key.key_id.hex(), None)

    def __getitem__(self, key_id_hex: str) -> VerifierKey:
        return self._keys[key_id_hex]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class VerifiedPayload:
    """A payload whose signature verified: its type, its exact signed bytes, the signer and the envelope bytes."""

    payload_type: str
    payload: bytes
    signer: VerifierKey
    envelope: bytes

    @property
    def key_id(self) -> str:
        return self.signer.key_id.hex()


def seal(payload_type: str, payload: bytes, key: SignerKey, *, max_size: int = MAX_ENVELOPE_SIZE) -> bytes:
    """Sign `payload` as `payload_type` with `key`; returns the compact JSON envelope bytes (at most `max_size`)."""
    _check_payload_type(payload_type)
    signature = key._sign(pae(payload_type, payload))
    envelope = {
        "payloadType": payload_type,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [{"keyid": key.key_id.hex(), "sig": base64.b64encode(signature).decode("ascii")}],
    }
    data = json.dumps(envelope, separators=(",", ":")).encode("ascii")
    if len(data) > max_size:
        raise TooLargeError("sealed envelope would exceed the size limit", limit=max_size, found=len(data))
    return data


def open_envelope(
    data: bytes,
    trusted: Mapping[str, VerifierKey],
    expected_type: str | AbstractSet[str],
    *,
    max_size: int = MAX_ENVELOPE_SIZE,
) -> VerifiedPayload:
    """Verify an envelope against `trusted` (hex key id -> key) and require `expected_type` (or one of a set: the
    versions of a message a reader takes; the caller picks the model by `VerifiedPayload.payload_type`).

    Signatures by keys not in `trusted` are ignored; a trusted key's signature that does not verify is an error; at
    least one trusted key must have signed. Raises only ProtocolError subclasses. `max_size` is the wire limit;
    only a document that is not a message (a provenance manifest, protocol.provenance) may raise it.
    """
    payload_type, payload, signatures = _parse(data, max_size)
    message = pae(payload_type, payload)
    signer: VerifierKey | None = None
    for kid, sig in signatures:
        key = trusted.get(kid)
        if key is None:
            continue
        if not key.verifies(message, sig):
            raise BadSignatureError("envelope signature does not verify", key_id=kid, payload_type=payload_type)
        signer = signer or key
    if signer is None:
        raise UnknownKeyError("envelope is not signed by a trusted key", key_ids=[kid for kid, _ in signatures])
    accepted = (expected_type,) if isinstance(expected_type, str) else expected_type
    if payload_type not in accepted:
        expected = expected_type if isinstance(expected_type, str) else sorted(expected_type)
        raise WrongTypeError("unexpected payloadType", expected=expected, found=payload_type)
    return VerifiedPayload(payload_type, payload, signer, bytes(data))


def decode(verified: VerifiedPayload, model: type[M]) -> M:
    """Parse a verified payload with `model` (strict, extra fields forbidden); the type must be the model's own."""
    return parse_unverified_payload(verified.payload_type, verified.payload, model)


def parse_unverified_payload(payload_type: str, payload: bytes, model: type[M]) -> M:
    """`decode` without the proof of a signature. Only for payloads that carry their own signer key (enrolment)."""
    expected = getattr(model, "PAYLOAD_TYPE", None)
    if expected is not None and payload_type != expected:
        raise WrongTypeError("payload is not of the model's type", expected=expected, found=payload_type)
    try:
        message = model.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        raise MalformedError(
            "payload does not match its schema",
            payload_type=payload_type,
            errors=[(".".join(str(p) for p in e["loc"]), e["type"]) for e in exc.errors(include_input=False)[:10]],
        ) from None
    # One message, one byte string: a payload in any other spelling (duplicate keys, which JSON parsers resolve
    # differently; whitespace; escapes; other key order) is refused, so an auditor re-reading the logged bytes with
    # any parser sees what the coordinator saw, and a seq signed twice with different bytes is a different message.
    canonical = getattr(message, "canonical_json", None)
    if canonical is not None and canonical() != payload:
        raise MalformedError("payload is not in canonical JSON form", payload_type=payload_type)
    return message


def envelope_digest(envelope: bytes) -> bytes:
    """SHA-256 of a signed envelope's exact bytes: how the ledger, dedup, receipts and the agent's own records name one
    signed statement (two different statements under one (key, seq) have different digests: equivocation)."""
    return hashlib.sha256(envelope).digest()


def peek_envelope(data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE) -> tuple[str, bytes, tuple[str, ...]]:
    """The UNVERIFIED payloadType, payload and key ids of an envelope, for the one case where the signer's key
    travels inside the payload (enrolment). Same size and strictness checks as `open_envelope`."""
    payload_type, payload, signatures = _parse(data, max_size)
    return payload_type, payload, tuple(kid for kid, _ in signatures)


def _parse(data: bytes, max_size: int = MAX_ENVELOPE_SIZE) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """Size first, then strict JSON shape; nothing is verified here."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedError("an envelope is bytes", found=type(data).__name__)
    if len(data) > max_size:
        raise TooLargeError("envelope exceeds the size limit", limit=max_size, found=len(data))
    sealed = _SEALED.fullmatch(data)
    if sealed is not None:
        # Exactly the bytes `seal` writes (one signature, no whitespace, nothing escaped): the JSON parse below would
        # find the same three strings. Measured: 9.4 -> 6.3 us per report envelope (a raw verification is ~105 us).
        payload_type, payload_b64, kid, sig_b64 = sealed.groups()
        return (
            payload_type.decode("ascii"),
            _strict_b64(payload_b64.decode("ascii"), "payload"),
            [(kid.decode("ascii"), _strict_b64(sig_b64.decode("ascii"), "sig"))],
        )
    return _parse_json(data)


def _parse_json(data: bytes) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """The strict JSON parse of an envelope of any spelling (size already checked)."""
    try:
        # Decoding first pins the encoding to UTF-8: json.loads(bytes) would also accept UTF-16 and UTF-32. Objects
        # stay lists of pairs (a C builtin as hook, measured cheaper than a Python one) so duplicates stay visible;
        # one shared decoder, since json.loads with options builds a new one per call.
        doc = _JSON.decode(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedError("envelope is not a UTF-8 JSON document", error=type(exc).__name__) from None
    fields = _fields(doc, _ENVELOPE_KEYS)
    if fields is None:
        raise MalformedError("envelope must be an object with exactly payloadType, payload and signatures")
    payload_type, payload_b64, signatures = fields["payloadType"], fields["payload"], fields["signatures"]
    if not isinstance(payload_type, str) or not _PAYLOAD_TYPE.fullmatch(payload_type):
        raise MalformedError("payloadType must be 1..128 printable ASCII characters without spaces")
    payload = _strict_b64(payload_b64, "payload")
    if not isinstance(signatures, list) or not 1 <= len(signatures) <= MAX_SIGNATURES:
        raise MalformedError(f"signatures must be a list of 1..{MAX_SIGNATURES} entries")
    parsed: list[tuple[str, bytes]] = []
    for entry in signatures:
        sig_fields = _fields(entry, _SIGNATURE_KEYS)
        if sig_fields is None:
            raise MalformedError("a signature must be an object with exactly keyid and sig")
        kid = sig_fields["keyid"]
        if not isinstance(kid, str) or not _KEY_ID_HEX.fullmatch(kid):
            raise MalformedError(f"keyid must be {2 * KEY_ID_SIZE} lowercase hex characters")
        sig = _strict_b64(sig_fields["sig"], "sig")
        if len(sig) != SIGNATURE_SIZE:
            raise MalformedError("sig must be a 64-byte Ed25519 signature", found=len(sig))
        parsed.append((kid, sig))
    return payload_type, payload, parsed


def _fields(value: Any, keys: frozenset[str]) -> dict[str, Any] | None:
    """A JSON object parsed as a pair list, as a dict; None unless its keys are exactly `keys`, each once."""
    # Parsed JSON holds tuples only as object pairs, so the first element tells an object from an array.
    if not isinstance(value, list) or len(value) != len(keys) or not isinstance(value[0], tuple):
        return None
    fields = dict(value)
    return fields if fields.keys() == keys else None


def _strict_b64(value: Any, name: str) -> bytes:
    """Standard base64 with padding, canonical: a text that re-encodes to itself (so no two texts share bytes)."""
    if not isinstance(value, str):
        raise MalformedError(f"{name} must be a base64 string")
    try:
        raw = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"{name} is not valid base64") from None
    # strict_mode still accepts non-zero bits after the last byte ("QR==" == "QQ=="); one bit flip must not pass.
    if binascii.b2a_base64(raw, newline=False) != value.encode("ascii"):
        raise MalformedError(f"{name} is not canonical base64")
    return raw


def _no_constant(name: str) -> NoReturn:
    raise MalformedError("NaN and Infinity are not JSON", found=name)


_JSON = json.JSONDecoder(object_pairs_hook=list, parse_constant=_no_constant)
# `seal`'s own output. The payloadType class is _PAYLOAD_TYPE's without '"' and '\\' (which JSON would escape); the
# base64 texts still go through _strict_b64, and anything else takes the JSON path.
_SEALED = re.compile(
    rb'\{"payloadType":"([\x21\x23-\x5b\x5d-\x7e]{1,%d})","payload":"([A-Za-z0-9+/]*={0,2})",'
    rb'"signatures":\[\{"keyid":"([0-9a-f]{%d})","sig":"([A-Za-z0-9+/]{86}==)"\}\]\}'
    % (MAX_PAYLOAD_TYPE_LEN, 2 * KEY_ID_SIZE)
)


def _check_payload_type(payload_type: str) -> None:
    if not _PAYLOAD_TYPE.fullmatch(payload_type):
        raise MalformedError("payloadType must be 1..128 printable ASCII characters without spaces")


__all__ = [
    "MAX_ENVELOPE_SIZE",
    "MAX_SIGNATURES",
    "KeyRing",
    "VerifiedPayload",
    "decode",
    "open_envelope",
    "pae",
    "parse_unverified_payload",
    "peek_envelope",
    "seal",
]
