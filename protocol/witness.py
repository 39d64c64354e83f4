"""Members as witnesses of the MID's log: the member-side checkpoint verifier, cosignatures and k-of-n policy.

`LogView` is what a member keeps: the last checkpoint it verified. It moves forward only with a valid consistency
proof, refuses a smaller tree (stale_checkpoint), and keeps two signed checkpoints of one size with different roots
as evidence (equivocation) — the MID cannot show two members two histories without one of them holding proof.

`Cosigner` turns a member into a C2SP tlog-witness: after `LogView` accepted a checkpoint, the member signs a C2SP
tlog-cosignature (`cosignature/v1`, Ed25519, key id algorithm byte 0x04, POSIX *seconds* timestamp as the spec
requires) and returns the signature line; the coordinator attaches it to the checkpoint it serves.
`CosignaturePolicy` requires k valid cosignatures from a set of member witness keys before a checkpoint is trusted,
so trust rests with the members and not with the MID's key alone.

A running agent cosigns with its device key (`CosignatureVerifier.for_key` is the same key in the cosignature role),
so the MID knows every witness key from enrolment and no second key has to be enrolled. That is safe because the two
uses can never sign the same bytes: a cosigned message starts `cosignature/v1\n`, a DSSE envelope's PAE starts
`DSSEv1 `, and a device key signs nothing else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol.checkpoint import (
    AddCheckpointBody,
    Checkpoint,
    VerifiedCheckpoint,
    open_checkpoint,
    parse_add_checkpoint_body,
)
from protocol.errors import (
    BadKeyError,
    BadSignatureError,
    EquivocationError,
    InconsistentError,
    MalformedError,
    QuorumNotMetError,
    StaleCheckpointError,
    UnknownKeyError,
)
from protocol.identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, SignerKey, VerifierKey, check_key_name
from protocol.merkle import EMPTY_ROOT, b64, verify_consistency
from protocol.note import Note, NoteSignature, parse_note

ALG_COSIGNATURE_V1 = 0x04
COSIGNATURE_HEADER = "cosignature/v1\n"
MAX_TIMESTAMP = (1 << 63) - 1
_COSIG_SIZE = 8 + SIGNATURE_SIZE


def cosigned_message(checkpoint_text: str, timestamp: int) -> bytes:
    """The bytes an Ed25519 cosignature signs (C2SP tlog-cosignature): header, time line, checkpoint text."""
    return f"{COSIGNATURE_HEADER}time {timestamp}\n{checkpoint_text}".encode()


@dataclass(frozen=True)
class CosignatureVerifier:
    """A member witness's public key in the cosignature/v1 role; usable as a `protocol.note.NoteVerifier`."""

    name: str
    public_key: bytes
    key_id: bytes = field(init=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if len(self.public_key) != PUBLIC_KEY_SIZE:
            raise BadKeyError("Ed25519 public key must be 32 bytes", found=len(self.public_key))
        kid = hashlib.sha256(self.name.encode() + b"\n" + bytes([ALG_COSIGNATURE_V1]) + self.public_key).digest()[:4]
        object.__setattr__(self, "key_id", kid)

    @classmethod
    def parse(cls, text: str) -> CosignatureVerifier:
        """Parse a vkey `name+hex(keyid)+base64(0x04 || public key)`."""
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise BadKeyError("witness key must be name+keyid+base64")
        name, kid_hex, material_b64 = parts
        try:
            kid = bytes.fromhex(kid_hex)
            material = base64.b64decode(material_b64, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise BadKeyError("witness key id or material is not valid hex/base64") from exc
        if len(material) != 1 + PUBLIC_KEY_SIZE or material[0] != ALG_COSIGNATURE_V1:
            raise BadKeyError("witness key must be 0x04 || 32-byte Ed25519 key", found_len=len(material))
        verifier = cls(name, material[1:])
        if verifier.key_id != kid:
            raise BadKeyError("key id does not match the key", expected=verifier.key_id.hex(), found=kid_hex)
        return verifier

    @classmethod
    def for_key(cls, key: VerifierKey) -> CosignatureVerifier:
        """The cosignature/v1 verifier of an Ed25519 signing key (same name and public key, key id with 0x04)."""
        return cls(key.name, key.public_key)

    def text(self) -> str:
        return f"{self.name}+{self.key_id.hex()}+{b64(bytes([ALG_COSIGNATURE_V1]) + self.public_key)}"

    def timestamp(self, signature: bytes) -> int:
        if len(signature) != _COSIG_SIZE:
            raise MalformedError("cosignature must be 8-byte time + 64-byte signature", found=len(signature))
        return int.from_bytes(signature[:8], "big")

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """True when `signature` (timestamp || Ed25519) cosigns the checkpoint text `message`. Never raises."""
        if len(signature) != _COSIG_SIZE:
            return False
        timestamp = int.from_bytes(signature[:8], "big")
        if timestamp > MAX_TIMESTAMP:
            return False
        try:
            signed = cosigned_message(message.decode(), timestamp)
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature[8:], signed)
        except (InvalidSignature, UnicodeDecodeError):
            return False
        return True


class Cosigner:
    """A member's witness identity: an Ed25519 key signing cosignature/v1 (a device key, or a key of its own)."""

    def __init__(self, key: SignerKey) -> None:
        self._key = key
        self.verifier = CosignatureVerifier(key.name, key.verifier.public_key)

    def cosign(self, checkpoint_text: str, timestamp: int) -> NoteSignature:
        """A cosignature line over `checkpoint_text` at POSIX time `timestamp` (seconds)."""
        if not 0 <= timestamp <= MAX_TIMESTAMP:
            raise MalformedError("cosignature timestamp out of range", found=timestamp)
        signature = self._key._sign(cosigned_message(checkpoint_text, timestamp))
        return NoteSignature(self.verifier.name, self.verifier.key_id, timestamp.to_bytes(8, "big") + signature)

    def cosigned_note(self, checkpoint_text: str, timestamp: int) -> bytes:
        """The checkpoint text with this witness's cosignature as its one signature line: a C2SP note, what an agent
        posts to its MID (`POST /v1/cosignature`)."""
        return Note(checkpoint_text, (self.cosign(checkpoint_text, timestamp),)).encode()

    def has_cosigned(self, note: bytes) -> bool:
        """True when `note` carries a cosignature by this witness that verifies over its text."""
        parsed = parse_note(note)
        return any(
            sig.name == self.verifier.name
            and sig.key_id == self.verifier.key_id
            and self.verifier.verifies(parsed.text.encode(), sig.signature)
            for sig in parsed.signatures
        )


def verify_cosignature(
    checkpoint_text: str, cosignature: NoteSignature, witnesses: Sequence[CosignatureVerifier]
) -> int:
    """Check one cosignature line against known witness keys; returns its timestamp.

    Raises UnknownKeyError for a key not in `witnesses`, BadSignatureError if it does not verify over this text.
    """
    for witness in witnesses:
        if witness.name == cosignature.name and witness.key_id == cosignature.key_id:
            if not witness.verifies(checkpoint_text.encode(), cosignature.signature):
                raise BadSignatureError("cosignature does not verify over this checkpoint", witness=witness.name)
            return witness.timestamp(cosignature.signature)
    raise UnknownKeyError("cosignature from an unknown witness key", witness=cosignature.name)


@dataclass(frozen=True)
class CosignaturePolicy:
    """Trust a checkpoint only with valid cosignatures from at least `quorum` distinct keys among `witnesses`."""

    witnesses: tuple[CosignatureVerifier, ...]
    quorum: int

    def __post_init__(self) -> None:
        if not 1 <= self.quorum <= len(self.witnesses):
            raise MalformedError("quorum must be between 1 and the number of witnesses", quorum=self.quorum)
        if len({(w.name, w.key_id) for w in self.witnesses}) != len(self.witnesses):
            raise MalformedError("witness keys must be distinct")

    def check(self, note: bytes, log_vkey: VerifierKey) -> VerifiedCheckpoint:
        """Verify the log signature and count valid witness cosignatures; raises QuorumNotMetError below quorum.

        Lines from unknown keys and cosignatures that do not verify over this checkpoint are not counted (a
        cosignature copied from another checkpoint is simply not a cosignature of this one).
        """
        opened = open_checkpoint(note, log_vkey)
        text = opened.verified.text
        valid: set[bytes] = set()
        rejected: list[str] = []
        for sig in parse_note(note).signatures:
            try:
                verify_cosignature(text, sig, self.witnesses)
            except (UnknownKeyError, BadSignatureError, MalformedError) as exc:
                if sig.name != log_vkey.name:
                    rejected.append(f"{sig.name}: {exc.reason}")
                continue
            valid.add(sig.key_id + sig.name.encode())
        if len(valid) < self.quorum:
            raise QuorumNotMetError(
                "not enough valid witness cosignatures", expected=self.quorum, found=len(valid), rejected=rejected
            )
        return opened


@dataclass(frozen=True)
class Equivocation:
    """Two checkpoints of one size with different roots, both validly signed by the log: proof of misbehaviour."""

    first: bytes
    second: bytes
    size: int


def verify_older_checkpoint(older: Checkpoint, trusted: Checkpoint, proof: Sequence[bytes]) -> None:
    """Check that `older` (e.g. the checkpoint a late receipt names) is a prefix of the `trusted` tree.

    An older checkpoint never replaces the trusted one, but a receipt under it counts only if it is consistent.
    Requires older.size <= trusted.size (InconsistentError otherwise). Same size: the roots must be equal
    (EquivocationError). Raises BadProofError / RootMismatchError for a proof that does not verify.
    """
    if older.size > trusted.size:
        raise InconsistentError("checkpoint is newer than the trusted one", trusted=trusted.size, found=older.size)
    if older.size == trusted.size:
        if older.root != trusted.root:
            raise EquivocationError(
                "log signed two different trees of the same size",
                size=older.size,
                trusted=b64(trusted.root),
                found=b64(older.root),
            )
        return
    verify_consistency(older.size, trusted.size, proof, older.root, trusted.root)


class LogView:
    """A member's view of the MID log: the last checkpoint it verified, and any evidence of equivocation."""

    def __init__(self, log_vkey: VerifierKey, trusted: bytes | None = None) -> None:
        """Start from a checkpoint note the member already trusts (e.g. persisted), or from the empty tree."""
        self.log_vkey = log_vkey
        self.evidence: list[Equivocation] = []
        self._note: bytes | None = None
        self._checkpoint = Checkpoint(log_vkey.name, 0, EMPTY_ROOT)
        if trusted is not None:
            opened = open_checkpoint(trusted, log_vkey)
            self._note, self._checkpoint = trusted, opened.checkpoint

    @property
    def checkpoint(self) -> Checkpoint:
        """The latest verified checkpoint (size 0 before the first one)."""
        return self._checkpoint

    @property
    def note(self) -> bytes | None:
        """The exact signed note of the latest verified checkpoint; persist it to resume."""
        return self._note

    def update(self, note: bytes, proof: Sequence[bytes]) -> VerifiedCheckpoint:
        """Accept `note` if it is signed by the log and `proof` proves it extends the trusted checkpoint.

        Raises StaleCheckpointError for a smaller tree, EquivocationError (evidence kept in `evidence`) for a
        same-size checkpoint with another root, BadProofError / RootMismatchError for a proof that does not verify.
        On any error the trusted state is unchanged.
        """
        opened = open_checkpoint(note, self.log_vkey)
        new, old = opened.checkpoint, self._checkpoint
        if new.size < old.size:
            raise StaleCheckpointError(
                "checkpoint is older than the one already trusted", trusted=old.size, found=new.size
            )
        if new.size == old.size and old.size > 0 and new.root != old.root:
            assert self._note is not None
            self.evidence.append(Equivocation(self._note, note, new.size))
            raise EquivocationError(
                "log signed two different trees of the same size",
                size=new.size,
                trusted=b64(old.root),
                found=b64(new.root),
            )
        verify_consistency(old.size, new.size, proof, old.root, new.root)
        self._note, self._checkpoint = note, new
        return opened

    def add_checkpoint(self, body: bytes) -> VerifiedCheckpoint:
        """Apply a tlog-witness add-checkpoint body; its old size must be the trusted size."""
        parsed = parse_add_checkpoint_body(body)
        self._require_old_size(parsed)
        return self.update(parsed.checkpoint_note, parsed.proof)

    def _require_old_size(self, body: AddCheckpointBody) -> None:
        if body.old_size != self._checkpoint.size:
            raise InconsistentError(
                "old size does not match the trusted checkpoint", expected=self._checkpoint.size, found=body.old_size
            )


class Witness:
    """A member acting as a tlog-witness: verify consistency against its own view, then cosign."""

    def __init__(self, view: LogView, cosigner: Cosigner) -> None:
        self.view = view
        self.cosigner = cosigner

    def add_checkpoint(self, body: bytes, now_s: int) -> NoteSignature:
        """Verify an add-checkpoint body against the trusted view and return a cosignature over the new checkpoint."""
        opened = self.view.add_checkpoint(body)
        return self.cosigner.cosign(opened.verified.text, now_s)
