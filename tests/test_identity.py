"""Identities: C2SP key encodings, key ids, and private key files that are 0600 or refused."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest

from protocol.errors import BadKeyError, InsecureKeyFileError, Reason
from protocol.identity import SignerKey, VerifierKey, key_id, load_signer_key, save_signer_key


def test_key_id_is_the_c2sp_formula() -> None:
    key = SignerKey.generate("mid-a")
    expected = hashlib.sha256(b"mid-a\n\x01" + key.verifier.public_key).digest()[:4]
    assert key.key_id == expected == key_id("mid-a", 1, key.verifier.public_key)


def test_same_key_under_another_name_has_another_id() -> None:
    key = SignerKey.generate("a")
    assert VerifierKey("b", key.verifier.public_key).key_id != key.key_id


def test_text_round_trips() -> None:
    key = SignerKey.generate("dev-1")
    again = SignerKey.parse(key.text())
    assert again.verifier == key.verifier
    assert VerifierKey.parse(key.verifier.text()) == key.verifier
    assert key.verifier.text().startswith(f"dev-1+{key.key_id.hex()}+")


def test_repr_never_shows_the_seed() -> None:
    key = SignerKey.generate("dev-1")
    secret = key.text().split("+", 4)[4]  # PRIVATE+KEY+name+hash+base64: the base64 itself may hold "+"
    assert secret not in repr(key)
    assert secret not in str(key)


def test_save_writes_0600_and_load_round_trips(tmp_path: Path) -> None:
    key = SignerKey.generate("dev-1")
    path = tmp_path / "keys" / "device.key"
    save_signer_key(path, key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_signer_key(path).verifier == key.verifier


def test_save_replaces_an_existing_file_keeping_0600(tmp_path: Path) -> None:
    path = tmp_path / "device.key"
    save_signer_key(path, SignerKey.generate("a"))
    second = SignerKey.generate("b")
    save_signer_key(path, second)
    assert load_signer_key(path).verifier == second.verifier
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_private_key_readable_or_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "device.key"
    save_signer_key(path, SignerKey.generate("dev-1"))
    os.chmod(path, mode)
    with pytest.raises(InsecureKeyFileError) as info:
        load_signer_key(path)
    assert info.value.reason is Reason.INSECURE_KEY_FILE
    assert f"chmod 600 {path}" in str(info.value)
    assert info.value.details["mode"] == oct(mode)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "name",
        "name+abcd",
        "na me+00000000+AQ==",
        "name+zzzzzzzz+" + "A" * 44,
        "name+0000+" + "A" * 44,
        "name+00000000+not base64!",
        "name+00000000+AQ==",
    ],
)
def test_malformed_verifier_keys_are_bad_key(text: str) -> None:
    with pytest.raises(BadKeyError):
        VerifierKey.parse(text)


def test_wrong_algorithm_byte_is_refused() -> None:
    key = SignerKey.generate("a").verifier
    material = base64.b64encode(b"\x02" + key.public_key).decode()
    with pytest.raises(BadKeyError):
        VerifierKey.parse(f"a+{key.key_id.hex()}+{material}")


def test_signer_key_needs_its_prefix() -> None:
    text = SignerKey.generate("a").text()
    with pytest.raises(BadKeyError):
        SignerKey.parse(text.removeprefix("PRIVATE+KEY+"))


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\nb", "x" * 257])
def test_key_names_follow_c2sp_rules(name: str) -> None:
    with pytest.raises(BadKeyError):
        SignerKey.generate(name)


def test_public_key_length_is_checked() -> None:
    with pytest.raises(BadKeyError):
        VerifierKey("a", bytes(31))
