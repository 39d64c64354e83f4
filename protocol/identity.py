"""Ed25519 identities and their C2SP signed-note key encodings.

A device has one key per MID (so memberships cannot be linked); the MID has one log key. Keys are named and
identified as in C2SP signed-note: key id = SHA-256(name || "\\n" || 0x01 || public key)[:4], verifier key text
`name+hex(keyid)+base64(0x01 || public key)`, signer key text `PRIVATE+KEY+name+hex(keyid)+base64(0x01 || seed)`.

Signing raw bytes is deliberately private to `protocol/`: callers seal envelopes (`protocol.envelope`) or sign notes
(`protocol.note`) and never handle signature bytes themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import BadKeyError, InsecureKeyFileError
from protocol.private_files import private_dir

ALG_ED25519 = 0x01
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
KEY_ID_SIZE = 4
_MAX_NAME_LEN = 256


def key_id(name: str, alg: int, public_key: bytes) -> bytes:
    """The 4-byte C2SP signed-note key id of a named key of algorithm `alg`."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public_key).digest()[:KEY_ID_SIZE]


def check_key_name(name: str) -> None:
    """Key names are non-empty, printable, without spaces or '+' (C2SP signed-note)."""
    if not name or len(name) > _MAX_NAME_LEN:
        raise BadKeyError("key name must be 1..256 characters", length=len(name))
    if any(c.isspace() or c == "+" or not c.isprintable() for c in name):
        raise BadKeyError("key name must not contain spaces, '+' or control characters", name=name)


@dataclass(frozen=True)
class VerifierKey:
    """A named Ed25519 public key that verifies signatures by its holder."""

    name: str
    public_key: bytes
    key_id: bytes = field(init=False)
    _key: Ed25519PublicKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if len(self.public_key) != PUBLIC_KEY_SIZE:
            raise BadKeyError(
                "Ed25519 public key must be 32 bytes", expected=PUBLIC_KEY_SIZE, found=len(self.public_key)
            )
        object.__setattr__(self, "key_id", key_id(self.name, ALG_ED25519, self.public_key))
        object.__setattr__(self, "_key", Ed25519PublicKey.from_public_bytes(self.public_key))

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        """Parse `name+hex(keyid)+base64(0x01||pubkey)`; the embedded key id must match the key."""
        name, kid, material = _split_key_text(text.strip())
        if len(material) != 1 + PUBLIC_KEY_SIZE or material[0] != ALG_ED25519:
            raise BadKeyError("verifier key must be 0x01 || 32-byte Ed25519 key", found_len=len(material))
        vk = cls(name, material[1:])
        if vk.key_id != kid:
            raise BadKeyError("key id does not match the key", expected=vk.key_id.hex(), found=kid.hex())
        return vk

    def text(self) -> str:
        """The C2SP verifier key string."""
        return f"{self.name}+{self.key_id.hex()}+{_b64(bytes([ALG_ED25519]) + self.public_key)}"

    def verifies(self, message: bytes, signature: bytes) -> bool:
        """True when `signature` is this key's Ed25519 signature over `message`. Never raises."""
        if len(signature) != SIGNATURE_SIZE:
            return False
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class SignerKey:
    """A named Ed25519 private key. Its seed never appears in repr, logs or exceptions."""

    __slots__ = ("_key", "name", "verifier")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        check_key_name(name)
        self.name = name
        self._key = private_key
        self.verifier = VerifierKey(name, private_key.public_key().public_bytes_raw())

    @classmethod
    def generate(cls, name: str) -> SignerKey:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def parse(cls, text: str) -> SignerKey:
        """Parse `PRIVATE+KEY+name+hex(keyid)+base64(0x01||seed)`."""
        prefix = "PRIVATE+KEY+"
        text = text.strip()
        if not text.startswith(prefix):
            raise BadKeyError("signer key must start with PRIVATE+KEY+")
        name, kid, material = _split_key_text(text[len(prefix) :])
        if len(material) != 1 + 32 or material[0] != ALG_ED25519:
            raise BadKeyError("signer key must be 0x01 || 32-byte Ed25519 seed", found_len=len(material))
        sk = cls(name, Ed25519PrivateKey.from_private_bytes(material[1:]))
        if sk.key_id != kid:
            raise BadKeyError("key id does not match the key", expected=sk.key_id.hex(), found=kid.hex())
        return sk

    @property
    def key_id(self) -> bytes:
        return self.verifier.key_id

    def text(self) -> str:
        """The C2SP signer key string. Secret: write it only with `save_signer_key`."""
        seed = self._key.private_bytes_raw()
        return f"PRIVATE+KEY+{self.name}+{self.key_id.hex()}+{_b64(bytes([ALG_ED25519]) + seed)}"

    def _sign(self, message: bytes) -> bytes:
        """Raw Ed25519 signature. Private to protocol/: use protocol.envelope.seal or protocol.note.sign_note."""
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"SignerKey({self.verifier.text()!r})"


def save_signer_key(path: Path, key: SignerKey) -> None:
    """Write `key` to `path` with mode 0600 (missing folders 0700), atomically (a crash leaves the old file or the
    new one)."""
    private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (key.text() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_signer_key(path: Path) -> SignerKey:
    """Load a signer key, refusing a file that group or others may read or write."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InsecureKeyFileError(
            f"private key file {path} is accessible by others; run: chmod 600 {path}",
            path=str(path),
            mode=oct(stat.S_IMODE(mode)),
        )
    return SignerKey.parse(path.read_text())


def _split_key_text(text: str) -> tuple[str, bytes, bytes]:
    parts = text.split("+", 2)
    if len(parts) != 3:
        raise BadKeyError("key text must be name+keyid+base64")
    name, kid_hex, material_b64 = parts
    check_key_name(name)
    try:
        kid = bytes.fromhex(kid_hex)
        material = base64.b64decode(material_b64, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise BadKeyError("key id or key material is not valid hex/base64") from exc
    if len(kid) != KEY_ID_SIZE:
        raise BadKeyError("key id must be 4 bytes", found=len(kid))
    return name, kid, material


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
