"""DSSE envelopes: round trips, every rejection path with its reason code, and hostile-input properties."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.envelope import (
    MAX_ENVELOPE_SIZE,
    KeyRing,
    decode,
    open_envelope,
    pae,
    peek_envelope,
    seal,
)
from protocol.errors import (
    BadKeyError,
    BadSignatureError,
    MalformedError,
    ProtocolError,
    Reason,
    TooLargeError,
    UnknownKeyError,
    WrongTypeError,
)
from protocol.identity import SignerKey, VerifierKey
from protocol.messages import Heartbeat, KnobUpdate

TYPE = "application/vnd.midgate.test.v1+json"
DEVICE = SignerKey.generate("device-a")
OTHER = SignerKey.generate("device-b")
RING = KeyRing([DEVICE.verifier])


def _doc(envelope: bytes) -> dict[str, object]:
    doc = json.loads(envelope)
    assert isinstance(doc, dict)
    return doc


def _reseal(doc: dict[str, object]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def test_pae_matches_the_dsse_spec_example() -> None:
    # The worked example of secure-systems-lab/dsse protocol.md.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_seal_open_round_trip_keeps_exact_bytes_and_signer() -> None:
    payload = b'{"z":1, "a":2}\n'
    envelope = seal(TYPE, payload, DEVICE)
    verified = open_envelope(envelope, RING, TYPE)
    assert verified.payload == payload
    assert verified.payload_type == TYPE
    assert verified.signer == DEVICE.verifier
    assert verified.key_id == DEVICE.key_id.hex()
    assert verified.envelope == envelope


def test_envelope_has_the_dsse_shape() -> None:
    doc = _doc(seal(TYPE, b"abc", DEVICE))
    assert doc["payloadType"] == TYPE
    assert doc["payload"] == base64.b64encode(b"abc").decode()
    (sig,) = doc["signatures"]  # type: ignore[misc]
    assert sig["keyid"] == DEVICE.key_id.hex()
    assert DEVICE.verifier.verifies(pae(TYPE, b"abc"), base64.b64decode(sig["sig"]))


def test_a_plain_mapping_of_key_ids_works_as_trust_store() -> None:
    envelope = seal(TYPE, b"x", DEVICE)
    assert open_envelope(envelope, {DEVICE.key_id.hex(): DEVICE.verifier}, TYPE).payload == b"x"


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(UnknownKeyError) as info:
        open_envelope(seal(TYPE, b"x", OTHER), RING, TYPE)
    assert info.value.reason is Reason.UNKNOWN_KEY


def test_signature_by_a_trusted_key_over_other_bytes_is_bad_signature() -> None:
    doc = _doc(seal(TYPE, b"original", DEVICE))
    doc["payload"] = base64.b64encode(b"forged").decode()
    with pytest.raises(BadSignatureError):
        open_envelope(_reseal(doc), RING, TYPE)


def test_type_change_breaks_the_signature_because_pae_covers_it() -> None:
    doc = _doc(seal(TYPE, b"x", DEVICE))
    doc["payloadType"] = "application/vnd.midgate.other.v1+json"
    with pytest.raises(BadSignatureError):
        open_envelope(_reseal(doc), RING, "application/vnd.midgate.other.v1+json")


def test_authentic_message_of_another_type_is_wrong_type() -> None:
    with pytest.raises(WrongTypeError) as info:
        open_envelope(seal(TYPE, b"x", DEVICE), RING, "application/vnd.midgate.other.v1+json")
    assert info.value.details["found"] == TYPE


def test_forgery_of_the_wrong_type_reports_the_forgery_not_the_type() -> None:
    # Type is compared after the signature, so a forged envelope is never counted as a routing mistake.
    doc = _doc(seal(TYPE, b"x", DEVICE))
    doc["payload"] = base64.b64encode(b"y").decode()
    with pytest.raises(BadSignatureError):
        open_envelope(_reseal(doc), RING, "application/vnd.midgate.other.v1+json")


def test_untrusted_extra_signature_is_ignored_but_a_bad_trusted_one_is_not() -> None:
    doc = _doc(seal(TYPE, b"x", DEVICE))
    other = _doc(seal(TYPE, b"x", OTHER))
    doc["signatures"] = other["signatures"] + doc["signatures"]  # type: ignore[operator]
    verified = open_envelope(_reseal(doc), RING, TYPE)
    assert verified.signer == DEVICE.verifier
    both = KeyRing([DEVICE.verifier, OTHER.verifier])
    assert open_envelope(_reseal(doc), both, TYPE).signer == OTHER.verifier
    bad = _doc(seal(TYPE, b"y", OTHER))
    doc["signatures"] = bad["signatures"] + doc["signatures"][1:]  # type: ignore[index, operator]
    with pytest.raises(BadSignatureError):
        open_envelope(_reseal(doc), both, TYPE)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.pop("payload"), "object with"),
        (lambda d: d.update(extra=1), "object with"),
        (lambda d: d.update(payload=5), "base64 string"),
        (lambda d: d.update(payload="YWJj\n"), "base64"),
        (lambda d: d.update(payload="YWJ="), "canonical"),
        (lambda d: d.update(payload="YWJjZA"), "base64"),
        (lambda d: d.update(payload="YW-j"), "base64"),
        (lambda d: d.update(payloadType=""), "payloadType"),
        (lambda d: d.update(payloadType="a b"), "payloadType"),
        (lambda d: d.update(payloadType="x" * 129), "payloadType"),
        (lambda d: d.update(payloadType=["x"]), "payloadType"),
        (lambda d: d.update(signatures=[]), "signatures"),
        (lambda d: d.update(signatures={}), "signatures"),
        (lambda d: d.update(signatures=d["signatures"] * 5), "signatures"),
        # upper-case hex, with a letter in it whatever the random key id's digits are (an all-digit id stays itself)
        (lambda d: d["signatures"][0].update(keyid=d["signatures"][0]["keyid"][:-1].upper() + "A"), "keyid"),
        (lambda d: d["signatures"][0].update(keyid="abc"), "keyid"),
        (lambda d: d["signatures"][0].update(extra="x"), "keyid and sig"),
        (lambda d: d["signatures"][0].pop("keyid"), "keyid and sig"),
        (lambda d: d["signatures"][0].update(sig=base64.b64encode(bytes(63)).decode()), "64-byte"),
        (lambda d: d.update(signatures=["x"]), "keyid and sig"),
    ],
)
def test_malformed_envelopes_are_rejected_precisely(mutate: object, fragment: str) -> None:
    doc = _doc(seal(TYPE, b"abc", DEVICE))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(MalformedError) as info:
        open_envelope(_reseal(doc), RING, TYPE)
    assert fragment in info.value.message
    assert info.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"null",
        b"[]",
        b'"x"',
        b"\xff\xfe{}",
        '{"payloadType":"t"}'.encode("utf-16"),
        b'{"payloadType":"t","payloadType":"t","payload":"","signatures":[]}',
        b'{"payloadType":NaN,"payload":"","signatures":[]}',
        b'{"payloadType":"\\ud800","payload":"","signatures":[]}',
        b"[" * 50_000 + b"]" * 10_000,
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ],
)
def test_hostile_json_is_malformed(raw: bytes) -> None:
    with pytest.raises(MalformedError):
        open_envelope(raw, RING, TYPE)


def test_oversized_input_is_rejected_before_parsing() -> None:
    # Not JSON at all: a size check that ran after parsing would report malformed instead.
    with pytest.raises(TooLargeError) as info:
        open_envelope(b"\xff" * (MAX_ENVELOPE_SIZE + 1), RING, TYPE)
    assert info.value.details == {"limit": MAX_ENVELOPE_SIZE, "found": MAX_ENVELOPE_SIZE + 1}


def test_seal_refuses_a_payload_that_cannot_fit() -> None:
    with pytest.raises(TooLargeError):
        seal(TYPE, bytes(MAX_ENVELOPE_SIZE), DEVICE)


def test_seal_refuses_a_bad_payload_type() -> None:
    with pytest.raises(MalformedError):
        seal("has space", b"x", DEVICE)


def test_keyring_refuses_two_keys_with_one_id() -> None:
    key = DEVICE.verifier
    ring = KeyRing([key])
    ring.add(key)
    assert len(ring) == 1
    impostor = VerifierKey.__new__(VerifierKey)
    object.__setattr__(impostor, "name", "impostor")
    object.__setattr__(impostor, "public_key", OTHER.verifier.public_key)
    object.__setattr__(impostor, "key_id", key.key_id)
    with pytest.raises(BadKeyError):
        ring.add(impostor)
    ring.remove(key)
    with pytest.raises(UnknownKeyError):
        open_envelope(seal(TYPE, b"x", DEVICE), ring, TYPE)


def test_decode_parses_only_the_models_own_type() -> None:
    beat = Heartbeat(seq=1, device_time_ms=1_800_000_000_000, status="idle")  # type: ignore[arg-type]
    verified = open_envelope(beat.seal(DEVICE), RING, Heartbeat.PAYLOAD_TYPE)
    assert decode(verified, Heartbeat) == beat
    with pytest.raises(WrongTypeError):
        decode(verified, KnobUpdate)


def test_decode_reports_schema_errors_as_malformed() -> None:
    verified = open_envelope(seal(Heartbeat.PAYLOAD_TYPE, b'{"v":1,"seq":1}', DEVICE), RING, Heartbeat.PAYLOAD_TYPE)
    with pytest.raises(MalformedError) as info:
        decode(verified, Heartbeat)
    assert ("seq", "value_error") in info.value.details["errors"]


def test_peek_returns_unverified_parts() -> None:
    envelope = seal(TYPE, b"x", OTHER)
    assert peek_envelope(envelope) == (TYPE, b"x", (OTHER.key_id.hex(),))


# --- properties ----------------------------------------------------------------------------------------------------

payload_types = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128)


@settings(max_examples=150, deadline=None)
@given(payload_type=payload_types, payload=st.binary(max_size=2048))
def test_property_seal_open_round_trip(payload_type: str, payload: bytes) -> None:
    verified = open_envelope(seal(payload_type, payload, DEVICE), RING, payload_type)
    assert (verified.payload_type, verified.payload) == (payload_type, payload)


SAMPLE = seal(TYPE, b'{"seq":"1","v":1}', DEVICE)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(0, len(SAMPLE) * 8 - 1))
def test_property_every_single_bit_flip_is_rejected(position: int) -> None:
    tampered = bytearray(SAMPLE)
    tampered[position // 8] ^= 1 << (position % 8)
    with pytest.raises(ProtocolError):
        open_envelope(bytes(tampered), RING, TYPE)


def test_exhaustively_every_single_bit_flip_is_rejected() -> None:
    # The property above samples; this walks all of them for one envelope, to leave no position untested.
    reasons: set[Reason] = set()
    for position in range(len(SAMPLE) * 8):
        tampered = bytearray(SAMPLE)
        tampered[position // 8] ^= 1 << (position % 8)
        with pytest.raises(ProtocolError) as info:
            open_envelope(bytes(tampered), RING, TYPE)
        reasons.add(info.value.reason)
    assert reasons <= {Reason.MALFORMED, Reason.BAD_SIGNATURE, Reason.UNKNOWN_KEY}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4096))
def test_property_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(data, RING, TYPE)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(SAMPLE) - 1))
def test_property_truncated_envelopes_are_malformed(cut: int) -> None:
    with pytest.raises(MalformedError):
        open_envelope(SAMPLE[:cut], RING, TYPE)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(doc=json_values)
def test_property_arbitrary_json_raises_only_protocol_errors(doc: object) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(json.dumps(doc).encode(), RING, TYPE)


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(1, 40_000), opener=st.sampled_from([b"[", b'{"a":']))
def test_property_nesting_bombs_are_rejected_with_a_reason(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    data = opener * depth + b"1" + closer * depth
    with pytest.raises(ProtocolError) as info:
        open_envelope(data, RING, TYPE)
    assert info.value.reason in {Reason.MALFORMED, Reason.TOO_LARGE}


@settings(max_examples=50, deadline=None)
@given(extra=st.integers(1, 4096))
def test_property_oversized_json_is_too_large(extra: int) -> None:
    pad = " " * (MAX_ENVELOPE_SIZE + extra - len(SAMPLE))
    with pytest.raises(TooLargeError):
        open_envelope(SAMPLE[:-1] + pad.encode() + b"}", RING, TYPE)


@pytest.mark.parametrize("value", ["{}", None, 5, memoryview(b"{}")])
def test_non_bytes_input_is_malformed_not_a_crash(value: object) -> None:
    with pytest.raises(ProtocolError):
        open_envelope(value, RING, TYPE)  # type: ignore[arg-type]


def test_bytearray_input_is_accepted() -> None:
    assert open_envelope(bytearray(SAMPLE), RING, TYPE).payload == b'{"seq":"1","v":1}'


# --- the fast path for `seal`'s own spelling must agree with the strict JSON parse ------------------------------------


def _both_parses(data: bytes) -> tuple[object, object]:
    from protocol.envelope import _parse, _parse_json

    def outcome(parse: object) -> object:
        try:
            return parse(data)  # type: ignore[operator]
        except ProtocolError as exc:
            return (type(exc), exc.reason, str(exc))

    return outcome(_parse), outcome(_parse_json)


def _sealed_variants() -> list[bytes]:
    sealed = seal(TYPE, b'{"seq":"1"}', DEVICE)
    doc = _doc(sealed)
    sig = doc["signatures"][0]["sig"]  # type: ignore[index]
    kid = DEVICE.key_id.hex()
    other_sig = base64.b64encode(bytes(64)).decode()
    variants = [
        sealed,
        seal("a", b"", DEVICE),
        seal("x" * 128, bytes(range(256)), DEVICE),
        seal(TYPE, b"\x00\xff" * 1000, OTHER),
        # payloadType characters JSON escapes or that the fast path leaves to the JSON parse
        sealed.replace(TYPE.encode(), b'a\\"b'),
        sealed.replace(TYPE.encode(), b"a\\\\b"),
        sealed.replace(TYPE.encode(), b"a\\u0041b"),
        sealed.replace(TYPE.encode(), b"x" * 129),
        sealed.replace(TYPE.encode(), b""),
        sealed.replace(TYPE.encode(), b"a b"),
        # non-canonical or broken base64 in both fields
        sealed.replace(b'"payload":"', b'"payload":"A'),
        sealed.replace(sig.encode(), sig[:-3].encode() + b"R=="),
        sealed.replace(sig.encode(), sig[:-2].encode() + b"="),
        sealed.replace(sig.encode(), sig.encode()[:-4] + b"===="),
        sealed.replace(sig.encode(), b"A" * 84 + b"AA=="),
        # other spellings and shapes
        sealed.replace(b",", b", ", 1),
        sealed.replace(b'{"keyid"', b'{"sig":"' + sig.encode() + b'","keyid"').replace(
            b',"sig":"' + sig.encode() + b'"', b""
        ),
        sealed.replace(kid.encode(), kid.upper().encode()),
        sealed.replace(b"}]}", b'},{"keyid":"' + kid.encode() + b'","sig":"' + other_sig.encode() + b'"}]}'),
        sealed + b"\n",
        b" " + sealed,
    ]
    return variants


@pytest.mark.parametrize("index", range(len(_sealed_variants())))
def test_fast_parse_of_sealed_envelopes_agrees_with_the_json_parse(index: int) -> None:
    fast, strict = _both_parses(_sealed_variants()[index])
    assert fast == strict


def test_the_fast_path_takes_what_seal_writes() -> None:
    from protocol.envelope import _SEALED

    for envelope in _sealed_variants()[:4]:
        assert _SEALED.fullmatch(envelope) is not None


@given(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=130),
    st.binary(max_size=300),
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_fast_parse_agrees_on_any_type_and_payload(payload_type: str, payload: bytes) -> None:
    envelope = json.dumps(
        {
            "payloadType": payload_type,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": DEVICE.key_id.hex(), "sig": base64.b64encode(bytes(64)).decode()}],
        },
        separators=(",", ":"),
    ).encode()
    fast, strict = _both_parses(envelope)
    assert fast == strict


def test_open_envelope_takes_one_of_a_set_of_types_in_one_verification() -> None:
    v1, v2 = "application/vnd.example.thing.v1+json", "application/vnd.example.thing.v2+json"
    other = "application/vnd.example.other.v1+json"
    envelope = seal(v2, b'{"v":2}', DEVICE)
    assert open_envelope(envelope, RING, frozenset({v1, v2})).payload_type == v2
    with pytest.raises(WrongTypeError) as err:
        open_envelope(envelope, RING, frozenset({v1, other}))
    assert (err.value.details["expected"], err.value.details["found"]) == (sorted({v1, other}), v2)
