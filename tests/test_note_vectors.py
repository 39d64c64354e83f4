"""C2SP signed-note against the public examples: the spec example verifies, signing reproduces x/mod's signature byte
for byte, and key strings round-trip."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from conftest import vectors_dir

from protocol.errors import BadKeyError, BadNoteError, BadSignatureError, UnknownKeyError
from protocol.identity import SignerKey, VerifierKey
from protocol.note import open_note, parse_note, sign_note

pytestmark = pytest.mark.vectors


def _examples() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((vectors_dir("signed-note") / "examples.json").read_text())
    assert doc["verify"] and doc["sign"]
    return doc


def _note(text: str, name: str, signature_b64: str) -> bytes:
    return f"{text}\n\u2014 {name} {signature_b64}\n".encode()


def test_spec_example_verifies() -> None:
    for case in _examples()["verify"]:
        key = VerifierKey.parse(case["vkey"])
        verified = open_note(_note(case["text"], key.name, case["signature_b64"]), [key])
        assert verified.text == case["text"]
        assert [s.name for s in verified.verified_by] == [key.name]


def test_spec_example_with_changed_text_does_not_verify() -> None:
    for case in _examples()["verify"]:
        key = VerifierKey.parse(case["vkey"])
        with pytest.raises(BadSignatureError):
            open_note(_note(case["text"].replace("example", "exemple"), key.name, case["signature_b64"]), [key])


def test_spec_example_under_an_unknown_key_is_not_trusted() -> None:
    for case in _examples()["verify"]:
        stranger = SignerKey.generate("example.com/foo").verifier
        with pytest.raises(UnknownKeyError):
            open_note(_note(case["text"], stranger.name, case["signature_b64"]), [stranger])


def test_signing_reproduces_the_expected_signature_byte_for_byte() -> None:
    for case in _examples()["sign"]:
        key = SignerKey.parse(case["skey"])
        note = sign_note(case["text"], key)
        assert note == _note(case["text"], key.name, case["expected_signature_b64"])
        assert open_note(note, [key.verifier]).text == case["text"]


def test_key_strings_round_trip() -> None:
    doc = _examples()
    for case in doc["verify"]:
        key = VerifierKey.parse(case["vkey"])
        assert key.text() == case["vkey"]
        assert key.key_id == base64.b64decode(case["signature_b64"])[:4]
    for case in doc["sign"]:
        key = SignerKey.parse(case["skey"])
        assert key.text() == case["skey"]
        assert key.key_id.hex() == case["skey"].split("+")[3]
        assert key.key_id == base64.b64decode(case["expected_signature_b64"])[:4]
        assert VerifierKey.parse(key.verifier.text()) == key.verifier


def test_key_id_mismatch_in_a_key_string_is_refused() -> None:
    vkey = _examples()["verify"][0]["vkey"]
    name, kid, material = vkey.split("+")
    with pytest.raises(BadKeyError, match="key id does not match"):
        VerifierKey.parse(f"{name}+{int(kid, 16) ^ 1:08x}+{material}")


def test_parse_note_refuses_a_note_without_signature_block() -> None:
    text = _examples()["verify"][0]["text"]
    with pytest.raises(BadNoteError):
        parse_note(text.encode())
