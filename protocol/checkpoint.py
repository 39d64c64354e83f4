"""C2SP tlog-checkpoint notes, tlog-proof receipts and tlog-witness add-checkpoint bodies.

A checkpoint (https://c2sp.org/tlog-checkpoint) is a signed note whose text is

    <origin>
    <tree size, decimal, no leading zeroes>
    <base64 root hash>
    [extension lines]

signed by the MID's log key. The project requires the log key's name to equal the origin, so one verifier key
names both the log and its signer.

A receipt (https://c2sp.org/tlog-proof) is `c2sp.org/tlog-proof@v1`, an optional `extra` line, `index N`, the
inclusion path (one base64 hash a line), an empty line, then the signed checkpoint verbatim. A device verifies it
offline with `verify_receipt(receipt_text, leaf_bytes, log_vkey)`.

An add-checkpoint body (https://c2sp.org/tlog-witness) is `old N`, consistency proof lines, an empty line, then the
signed checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.errors import BadNoteError, BadProofError, MalformedError, ProtocolError, TooLargeError
from protocol.identity import SignerKey, VerifierKey
from protocol.merkle import HASH_SIZE, MAX_PROOF_HASHES, b64, leaf_hash, verify_inclusion
from protocol.note import MAX_NOTE_SIZE, NoteVerifier, VerifiedNote, open_note, parse_note, sign_note

RECEIPT_HEADER = "c2sp.org/tlog-proof@v1"
MAX_RECEIPT_SIZE = MAX_NOTE_SIZE + 16 * 1024
MAX_TREE_SIZE = (1 << 63) - 1
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")


@dataclass(frozen=True)
class Checkpoint:
    """The three mandatory lines of a checkpoint (plus opaque extension lines)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        """The note text, ending in a newline."""
        lines = [self.origin, str(self.size), b64(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint whose log signature verified; `note` is the exact signed note (with any cosignatures)."""

    checkpoint: Checkpoint
    note: bytes
    verified: VerifiedNote


def parse_checkpoint_text(text: str) -> Checkpoint:
    """Parse a checkpoint's note text (not verified)."""
    if not text.endswith("\n"):
        raise BadNoteError("checkpoint text must end in a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise BadNoteError("checkpoint needs origin, size and root lines", found=len(lines))
    origin, size_line, root_line, *extensions = lines
    if not origin:
        raise BadNoteError("checkpoint origin must not be empty")
    if any(not line for line in extensions):
        raise BadNoteError("checkpoint extension lines must not be empty")
    return Checkpoint(origin, parse_decimal(size_line, "tree size"), decode_hash(root_line, "root"), tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, log_key: SignerKey) -> bytes:
    """The signed checkpoint note. The log key's name must be the checkpoint's origin."""
    if log_key.name != checkpoint.origin:
        raise BadNoteError("log key name must equal the checkpoint origin", origin=checkpoint.origin, key=log_key.name)
    return sign_note(checkpoint.text(), log_key)


def open_checkpoint(note: bytes, log_vkey: VerifierKey, extra: Sequence[NoteVerifier] = ()) -> VerifiedCheckpoint:
    """Verify a checkpoint note's log signature and parse it; its origin must be the log key's name.

    `extra` verifiers (e.g. witness cosignature keys) are checked as well when their lines are present.
    """
    verified = open_note(note, [log_vkey, *extra])
    if not any(s.name == log_vkey.name and s.key_id == log_vkey.key_id for s in verified.verified_by):
        raise BadNoteError("checkpoint is not signed by the log key", log=log_vkey.name)
    checkpoint = parse_checkpoint_text(verified.text)
    if checkpoint.origin != log_vkey.name:
        raise BadNoteError("checkpoint origin is not this log", expected=log_vkey.name, found=checkpoint.origin)
    return VerifiedCheckpoint(checkpoint, note, verified)


@dataclass(frozen=True)
class Receipt:
    """A parsed c2sp.org/tlog-proof: leaf index, inclusion path and the signed checkpoint (not yet verified)."""

    index: int
    proof: tuple[bytes, ...]
    checkpoint_note: bytes
    extra: bytes | None = None

    def text(self) -> str:
        lines = [RECEIPT_HEADER]
        if self.extra is not None:
            lines.append("extra " + b64(self.extra))
        lines.append(f"index {self.index}")
        lines.extend(b64(h) for h in self.proof)
        return "".join(line + "\n" for line in lines) + "\n" + self.checkpoint_note.decode()


def parse_receipt(data: bytes | str) -> Receipt:
    """Parse a c2sp.org/tlog-proof text without verifying it."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_RECEIPT_SIZE:
        raise TooLargeError("receipt too large", limit=MAX_RECEIPT_SIZE, found=len(raw))
    head, note = _split_head(raw, "receipt")
    lines = head.split("\n")
    if lines[0] != RECEIPT_HEADER:
        raise MalformedError("receipt must start with " + RECEIPT_HEADER, found=lines[0][:80])
    rest = lines[1:]
    extra = None
    if rest and rest[0].startswith("extra "):
        extra = _decode_b64(rest[0][len("extra ") :], "extra")
        rest = rest[1:]
    if not rest or not rest[0].startswith("index "):
        raise MalformedError("receipt needs an 'index N' line")
    index = parse_decimal(rest[0][len("index ") :], "index")
    proof = _parse_hash_lines(rest[1:])
    return Receipt(index, proof, note, extra)


@dataclass(frozen=True)
class VerifiedReceipt:
    """A receipt whose checkpoint signature and inclusion proof both verified."""

    index: int
    checkpoint: VerifiedCheckpoint


def verify_receipt(receipt: bytes | str, leaf: bytes, log_vkey: VerifierKey) -> VerifiedReceipt:
    """Verify offline that `leaf` (exact leaf bytes) is in the log, at the receipt's index, under its checkpoint."""
    return verify_receipt_hash(receipt, leaf_hash(leaf), log_vkey)


def verify_receipt_hash(receipt: bytes | str, leaf_hash_value: bytes, log_vkey: VerifierKey) -> VerifiedReceipt:
    """As `verify_receipt`, for a caller that holds only the RFC 9162 leaf hash."""
    parsed = parse_receipt(receipt)
    opened = open_checkpoint(parsed.checkpoint_note, log_vkey)
    cp = opened.checkpoint
    verify_inclusion(parsed.index, cp.size, leaf_hash_value, parsed.proof, cp.root)
    return VerifiedReceipt(parsed.index, opened)


def verify_receipts(items: Sequence[tuple[bytes | str, bytes]], log_vkey: VerifierKey) -> list[VerifiedReceipt]:
    """Verify a statement's (receipt, leaf bytes) pairs; each distinct checkpoint's signature is checked once.

    Raises on the first receipt that does not verify, with its position in `items`.
    """
    opened: dict[bytes, VerifiedCheckpoint] = {}
    results = []
    for position, (receipt, leaf) in enumerate(items):
        parsed = parse_receipt(receipt)
        checkpoint = opened.get(parsed.checkpoint_note)
        if checkpoint is None:
            checkpoint = opened[parsed.checkpoint_note] = open_checkpoint(parsed.checkpoint_note, log_vkey)
        cp = checkpoint.checkpoint
        try:
            verify_inclusion(parsed.index, cp.size, leaf_hash(leaf), parsed.proof, cp.root)
        except ProtocolError as exc:
            exc.details["receipt"] = position
            raise
        results.append(VerifiedReceipt(parsed.index, checkpoint))
    return results


@dataclass(frozen=True)
class AddCheckpointBody:
    """A parsed tlog-witness add-checkpoint request body."""

    old_size: int
    proof: tuple[bytes, ...]
    checkpoint_note: bytes

    def encode(self) -> bytes:
        lines = [f"old {self.old_size}", *(b64(h) for h in self.proof)]
        return ("".join(line + "\n" for line in lines) + "\n").encode() + self.checkpoint_note


def parse_add_checkpoint_body(data: bytes) -> AddCheckpointBody:
    """Parse an add-checkpoint body: `old N`, at most 63 proof lines, an empty line, the signed checkpoint."""
    if len(data) > MAX_RECEIPT_SIZE:
        raise TooLargeError("add-checkpoint body too large", limit=MAX_RECEIPT_SIZE, found=len(data))
    head, note = _split_head(data, "add-checkpoint body")
    lines = head.split("\n")
    if not lines[0].startswith("old "):
        raise MalformedError("add-checkpoint body must start with 'old N'", found=lines[0][:80])
    old_size = parse_decimal(lines[0][len("old ") :], "old size")
    proof = _parse_hash_lines(lines[1:])
    if len(proof) > 63:
        raise BadProofError("tlog-witness allows at most 63 consistency proof lines", found=len(proof))
    return AddCheckpointBody(old_size, proof, note)


def parse_decimal(text: str, what: str) -> int:
    """An ASCII decimal with no leading zeroes (C2SP), at most 2^63-1."""
    if not _DECIMAL.fullmatch(text) or int(text) > MAX_TREE_SIZE:
        raise MalformedError(f"{what} must be a decimal without leading zeroes", found=text[:32])
    return int(text)


def decode_hash(text: str, what: str) -> bytes:
    value = _decode_b64(text, what)
    if len(value) != HASH_SIZE:
        raise MalformedError(f"{what} must be a {HASH_SIZE}-byte hash", found=len(value))
    return value


def _decode_b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise MalformedError(f"{what} is not valid base64", found=text[:80]) from exc


def _split_head(raw: bytes, what: str) -> tuple[str, bytes]:
    """Split `<head lines>\\n\\n<note>`; the note is kept as exact bytes and checked to parse as a note."""
    split = raw.find(b"\n\n")
    if split < 0:
        raise MalformedError(f"{what} needs an empty line before the checkpoint")
    try:
        head = raw[:split].decode("ascii")
    except UnicodeDecodeError as exc:
        raise MalformedError(f"{what} header must be ASCII") from exc
    note = raw[split + 2 :]
    parse_note(note)
    return head, note


def _parse_hash_lines(lines: Sequence[str]) -> tuple[bytes, ...]:
    if len(lines) > MAX_PROOF_HASHES:
        raise BadProofError("proof too long", limit=MAX_PROOF_HASHES, found=len(lines))
    return tuple(decode_hash(line, f"proof line {i}") for i, line in enumerate(lines))
