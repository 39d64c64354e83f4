"""C2SP signed-note: a text signed by one or more named keys (https://c2sp.org/signed-note).

    <text ending in "\\n">
    <empty line>
    — <key name> <base64(key id || signature)>
    ...

Checkpoints are signed notes (MID log key, Ed25519) and carry member cosignatures (C2SP tlog-cosignature) as
further signature lines. Verification follows the spec: signatures by unknown keys are ignored, a signature by a
known key that does not verify is an error, and at least one known key must have signed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.errors import BadNoteError, BadSignatureError, TooLargeError, UnknownKeyError
from protocol.identity import KEY_ID_SIZE, SignerKey, VerifierKey

MAX_NOTE_SIZE = 1 << 20
MAX_SIGNATURES = 100
_SIG_PREFIX = "\u2014 "


class NoteVerifier(Protocol):
    """Anything that can check one signature line of a note: a `VerifierKey`, a cosignature verifier, ..."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def verifies(self, message: bytes, signature: bytes) -> bool: ...


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the signer's name, key id and the signature bytes that follow the key id."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        return f"{_SIG_PREFIX}{self.name} {base64.b64encode(self.key_id + self.signature).decode()}\n"


@dataclass(frozen=True)
class Note:
    """A parsed, not yet verified note."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def encode(self) -> bytes:
        return (self.text + "\n" + "".join(s.line() for s in self.signatures)).encode()


@dataclass(frozen=True)
class VerifiedNote:
    """A note with the signatures that verified under the given keys (by name)."""

    text: str
    verified_by: tuple[NoteSignature, ...]
    note: Note


def check_note_text(text: str) -> None:
    """Requires: text ends in a newline and has no control characters other than newline."""
    if not text.endswith("\n"):
        raise BadNoteError("note text must end in a newline")
    if any((ord(c) < 0x20 and c != "\n") or ord(c) == 0x7F for c in text):
        raise BadNoteError("note text must not contain control characters")


def sign_note(text: str, *signers: SignerKey) -> bytes:
    """Sign `text` with every signer; returns the encoded note."""
    check_note_text(text)
    if not signers:
        raise BadNoteError("a note needs at least one signer")
    message = text.encode()
    sigs = tuple(NoteSignature(s.name, s.key_id, s._sign(message)) for s in signers)
    return Note(text, sigs).encode()


def parse_note(data: bytes) -> Note:
    """Split a note into text and signature lines without verifying anything."""
    if len(data) > MAX_NOTE_SIZE:
        raise TooLargeError("note too large", limit=MAX_NOTE_SIZE, found=len(data))
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadNoteError("note is not UTF-8") from exc
    split = decoded.rfind("\n\n")
    if split < 0:
        raise BadNoteError("note has no empty line before its signatures")
    text, sig_block = decoded[: split + 1], decoded[split + 2 :]
    check_note_text(text)
    if not sig_block.endswith("\n"):
        raise BadNoteError("signature block must end in a newline")
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise BadNoteError("too many signatures", limit=MAX_SIGNATURES, found=len(lines))
    return Note(text, tuple(_parse_signature_line(line) for line in lines))


def add_signatures(note: bytes, extra: Iterable[NoteSignature]) -> bytes:
    """The same note with more signature lines (e.g. cosignatures), skipping ones already present."""
    parsed = parse_note(note)
    sigs = list(parsed.signatures)
    for sig in extra:
        if sig not in sigs:
            sigs.append(sig)
    return Note(parsed.text, tuple(sigs)).encode()


def open_note(data: bytes, verifiers: Sequence[NoteVerifier]) -> VerifiedNote:
    """Verify a note against known keys. Unknown signers are ignored; a known signer's bad signature is an error."""
    note = parse_note(data)
    known = {(v.name, v.key_id): v for v in verifiers}
    message = note.text.encode()
    verified: list[NoteSignature] = []
    for sig in note.signatures:
        verifier = known.get((sig.name, sig.key_id))
        if verifier is None:
            continue
        if not verifier.verifies(message, sig.signature):
            raise BadSignatureError("note signature does not verify", signer=sig.name, key_id=sig.key_id.hex())
        verified.append(sig)
    if not verified:
        raise UnknownKeyError(
            "note is not signed by any known key",
            signers=[s.name for s in note.signatures],
            known=[v.name for v in verifiers],
        )
    return VerifiedNote(note.text, tuple(verified), note)


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(_SIG_PREFIX):
        raise BadNoteError("signature line must start with an em dash and a space", line=line[:80])
    fields = line[len(_SIG_PREFIX) :].split(" ")
    if len(fields) != 2 or not fields[0]:
        raise BadNoteError("signature line must be '— name base64'", line=line[:80])
    name, b64 = fields
    try:
        raw = base64.b64decode(b64, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise BadNoteError("signature is not valid base64", signer=name) from exc
    if len(raw) <= KEY_ID_SIZE:
        raise BadNoteError("signature too short", signer=name, found=len(raw))
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


__all__ = [
    "MAX_NOTE_SIZE",
    "Note",
    "NoteSignature",
    "NoteVerifier",
    "VerifiedNote",
    "VerifierKey",
    "add_signatures",
    "open_note",
    "parse_note",
    "sign_note",
]
