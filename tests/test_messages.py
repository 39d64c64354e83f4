"""Message models: strictness, wire conventions (u64 strings, ms, minor units), canonical bytes, sealed round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol.envelope import KeyRing, decode, open_envelope, seal
from protocol.errors import BadSignatureError, MalformedError, ReplayedError, TooLargeError, WrongTypeError
from protocol.identity import SignerKey
from protocol.messages import (
    MAX_CONTRIBUTION_BODY_BYTES,
    MAX_TIME_MS,
    MESSAGE_BY_PAYLOAD_TYPE,
    MESSAGE_TYPES,
    MIN_TIME_MS,
    U64_MAX,
    CheckpointAnnouncement,
    ConsentPolicy,
    ContributionBody,
    ContributionReport,
    DeviceStatus,
    DpParams,
    EnrolmentRequest,
    EnrolmentResponse,
    Heartbeat,
    KeyRevocation,
    KnobUpdate,
    LeaveNotice,
    Receipt,
    ReceiptBatch,
    ReceiptPath,
    Refusal,
    RevenueReport,
    RoundInvitation,
    Statement,
    StatementLine,
    StatementRequest,
    StrikeVote,
    WireMessage,
    open_enrolment_request,
    require_newer_seq,
)

NOW = 1_800_000_000_000
H = "ab" * 32
DEVICE = SignerKey.generate("device-a")
MID = SignerKey.generate("mid-example")


def report(**changes: Any) -> ContributionReport:
    fields: dict[str, Any] = {
        "run_id": 12,
        "round": 3,
        "node_id": 2**63 + 1,
        "seq": 41,
        "device_time_ms": NOW,
        "task_id": "har-cnn",
        "task_version": 1,
        "round_nonce": "0f" * 16,
        "global_model_sha256": H,
        "update_sha256": "cd" * 32,
        "examples": 512,
        "dataset_fingerprint": "ef" * 32,
        "loss_before": 1.25,
        "loss_after": 0.75,
        "seconds": 12.5,
        "dp": DpParams(clipping_norm=1.0, noise_multiplier=0.5),
    }
    fields.update(changes)
    return ContributionReport(**fields)


G, OFFSET = "12" * 32, "34" * 32


def drift_report(**changes: Any) -> ContributionReport:
    """A drift-corrected job's report: no DP (such jobs refuse it), and the drift hashes."""
    return report(**{"dp": None, "gradient_sha256": G, "drift_offset_sha256": OFFSET, **changes})


SAMPLES: list[WireMessage] = [
    EnrolmentRequest(
        mid="mid-a",
        device="dev-1",
        device_key=DEVICE.verifier.text(),
        invite_token="A" * 22,
        seq=1,
        device_time_ms=NOW,
    ),
    EnrolmentResponse(
        mid="mid-a",
        device="dev-1",
        accepted=True,
        member="m-1",
        mid_key=MID.verifier.text(),
        request_seq=1,
        issued_ms=NOW,
    ),
    report(),
    Heartbeat(seq=2, device_time_ms=NOW, status=DeviceStatus.TRAINING, samples_stored=10),
    Receipt(
        device_key_id=DEVICE.key_id.hex(),
        seq=41,
        envelope_sha256=H,
        leaf_index=7,
        tlog_proof="c2sp.org/tlog-proof@v1\nindex 7\n",
        issued_ms=NOW,
    ),
    CheckpointAnnouncement(tree_size=8, checkpoint="example.com/log\n8\nAAAA\n\n— x y\n", issued_ms=NOW),
    RoundInvitation(
        job_id="job-1",
        run_id=5,
        round=1,
        task_id="har-cnn",
        task_version=1,
        purpose="health-research",
        buyer="acme",
        nonce="01" * 16,
        issued_ms=NOW,
        deadline_ms=NOW + 60_000,
    ),
    KnobUpdate(seq=3, device_time_ms=NOW, bias_milli=-250),
    ConsentPolicy(seq=4, device_time_ms=NOW, allowed_purposes=("health-research",), denied_buyers=("adtech",)),
    StrikeVote(seq=5, device_time_ms=NOW, target_buyer="acme", start_ms=NOW, end_ms=NOW + 1),
    LeaveNotice(seq=6, device_time_ms=NOW, left_ms=NOW - 1000),
    ReceiptBatch(
        checkpoint="example.com/log\n8\nAAAA\n\n— x y\n",
        receipts=(ReceiptPath(seq=41, leaf_index=7, path=("A" * 43 + "=",)),),
        issued_ms=NOW,
    ),
    KeyRevocation(mid="mid-a", device="dev-1", device_key=DEVICE.verifier.text(), revoked_ms=NOW, reason="lost"),
    Statement(
        mid="mid-a",
        member="m-1",
        currency="EUR",
        period_start_ms=NOW,
        period_end_ms=NOW + 1,
        lines=(
            StatementLine(kind="training", job_id="job-1", amount_minor=1234),
            StatementLine(kind="fee", amount_minor=-34),
        ),
        total_minor=1200,
        checkpoint_size=9,
        issued_ms=NOW,
    ),
    RevenueReport(
        mid="mid-a",
        buyer="acme",
        model_id="air-quality",
        model_version="job-1:v1",
        period_start_ms=NOW,
        period_end_ms=NOW + 1,
        amount_minor=500_000,
        currency="EUR",
        seq=1,
        issued_ms=NOW,
    ),
    Refusal(
        device_key_id="0a1b2c3d",
        seq=41,
        envelope_sha256="ab" * 32,
        reason="update_mismatch",
        detail="report names another update",
        issued_ms=NOW,
    ),
    drift_report(seq=42),
    StatementRequest(
        mid="mid-a",
        device="dev-1",
        period_start_ms=NOW,
        period_end_ms=NOW + 1,
        nonce="ab" * 16,
        issued_ms=NOW,
    ),
]


def test_every_message_type_has_a_sample_and_a_unique_versioned_payload_type() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES)
    assert len(MESSAGE_BY_PAYLOAD_TYPE) == len(MESSAGE_TYPES)
    for model in MESSAGE_TYPES:
        assert model.PAYLOAD_TYPE.startswith("application/vnd.midgate.")
        version = model.model_fields["v"].default
        assert model.PAYLOAD_TYPE.endswith(f".v{version}+json")
        assert version == 1 or model is ContributionReport  # v2: v1 (without drift hashes) is retired


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_sealed_round_trip_of_every_message(message: WireMessage) -> None:
    signer = DEVICE if type(message).__name__ in {"EnrolmentRequest", "ContributionReport"} else MID
    verified = open_envelope(message.seal(signer), KeyRing([signer.verifier]), message.PAYLOAD_TYPE)
    assert verified.payload == message.canonical_json()
    assert decode(verified, type(message)) == message


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_canonical_json_is_sorted_compact_and_stable(message: WireMessage) -> None:
    data = message.canonical_json()
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert data == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert type(message).model_validate_json(data).canonical_json() == data


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_refuses_unknown_fields(message: WireMessage) -> None:
    doc = json.loads(message.canonical_json())
    doc["unexpected"] = 1
    with pytest.raises(ValidationError, match="extra_forbidden"):
        type(message).model_validate_json(json.dumps(doc), strict=True)


def test_u64_travels_as_a_decimal_string_and_keeps_precision() -> None:
    big = report(seq=U64_MAX, node_id=2**53 + 1)
    doc = json.loads(big.canonical_json())
    assert doc["seq"] == str(U64_MAX)
    assert doc["node_id"] == "9007199254740993"
    assert ContributionReport.model_validate_json(big.canonical_json(), strict=True).node_id == 2**53 + 1


@pytest.mark.parametrize("bad", [41, "041", "-1", "+1", " 1", "1.0", "1e3", str(U64_MAX + 1), "", "0x10", True])
def test_u64_on_the_wire_must_be_a_canonical_decimal_string(bad: object) -> None:
    doc = json.loads(report().canonical_json())
    doc["seq"] = bad
    with pytest.raises(ValidationError):
        ContributionReport.model_validate_json(json.dumps(doc), strict=True)


@pytest.mark.parametrize("bad", [-1, U64_MAX + 1, True, 1.0])
def test_u64_in_python_must_be_an_int_in_range(bad: object) -> None:
    with pytest.raises(ValidationError):
        report(seq=bad)


@pytest.mark.parametrize("ms", [MIN_TIME_MS - 1, MAX_TIME_MS + 1, 1_800_000_000, 1_800_000_000_000_000])
def test_timestamps_outside_the_sane_range_are_refused(ms: int) -> None:
    with pytest.raises(ValidationError):
        report(device_time_ms=ms)


@pytest.mark.parametrize(
    "change",
    [
        {"loss_after": float("nan")},
        {"loss_before": float("inf")},
        {"seconds": -1.0},
        {"examples": -1},
        {"examples": "5"},
        {"round": 1.0},
        {"task_id": "Har"},
        {"task_id": "a/b"},
        {"task_id": "+"},
        {"task_id": "-x"},
        {"round_nonce": "0F" * 16},
        {"update_sha256": "ab" * 31},
        {"global_model_sha256": "xy" * 32},
        {"task_version": 0},
    ],
)
def test_contribution_report_field_rules(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        report(**change)


def test_contribution_report_round_trip_keeps_the_drift_hashes() -> None:
    message = drift_report(seq=U64_MAX)
    envelope = message.seal(DEVICE)
    assert json.loads(envelope)["payloadType"] == "application/vnd.midgate.contribution-report.v2+json"
    verified = open_envelope(envelope, KeyRing([DEVICE.verifier]), ContributionReport.PAYLOAD_TYPE)
    decoded = decode(verified, ContributionReport)
    assert decoded == message
    assert (decoded.v, decoded.gradient_sha256, decoded.drift_offset_sha256) == (2, G, OFFSET)
    assert json.loads(verified.payload)["v"] == 2


def test_a_report_without_drift_correction_carries_both_drift_hashes_as_null() -> None:
    doc = json.loads(report().canonical_json())
    assert (doc["gradient_sha256"], doc["drift_offset_sha256"]) == (None, None)
    # Every field is always present: a payload that leaves the nulls out is not in canonical form.
    del doc["gradient_sha256"], doc["drift_offset_sha256"]
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    verified = open_envelope(
        seal(ContributionReport.PAYLOAD_TYPE, payload, DEVICE),
        KeyRing([DEVICE.verifier]),
        ContributionReport.PAYLOAD_TYPE,
    )
    with pytest.raises(MalformedError, match="canonical"):
        decode(verified, ContributionReport)


def test_contribution_report_names_both_drift_hashes_or_neither() -> None:
    assert drift_report(gradient_sha256=None, drift_offset_sha256=None).gradient_sha256 is None
    for one_missing in ({"gradient_sha256": None}, {"drift_offset_sha256": None}):
        with pytest.raises(ValidationError, match="both set or both null"):
            drift_report(**one_missing)
    doc = json.loads(drift_report().canonical_json())
    doc["drift_offset_sha256"] = None
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    verified = open_envelope(
        seal(ContributionReport.PAYLOAD_TYPE, payload, DEVICE),
        KeyRing([DEVICE.verifier]),
        ContributionReport.PAYLOAD_TYPE,
    )
    with pytest.raises(MalformedError):
        decode(verified, ContributionReport)


@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "", 7])
def test_contribution_report_drift_hashes_are_sha256_hex(bad: object) -> None:
    with pytest.raises(ValidationError):
        drift_report(gradient_sha256=bad)


def test_the_retired_v1_report_is_refused_by_its_payload_type() -> None:
    v1 = "application/vnd.midgate.contribution-report.v1+json"
    assert v1 not in MESSAGE_BY_PAYLOAD_TYPE
    envelope = seal(v1, report().canonical_json(), DEVICE)
    with pytest.raises(WrongTypeError) as raised:
        open_envelope(envelope, KeyRing([DEVICE.verifier]), ContributionReport.PAYLOAD_TYPE)
    assert raised.value.details == {"expected": ContributionReport.PAYLOAD_TYPE, "found": v1}


def test_the_report_is_its_body_and_what_the_agent_adds_when_it_signs() -> None:
    message = report()
    spooled = ContributionBody.parse(body().canonical_json())
    assert ContributionReport.from_body(spooled, seq=41, device_time_ms=NOW, round_nonce="0f" * 16) == message
    assert set(ContributionReport.model_fields) - set(ContributionBody.model_fields) == {
        "v",
        "seq",
        "device_time_ms",
        "round_nonce",
    }
    with pytest.raises(MalformedError):  # a signed report is not a body: it carries what only the agent adds
        ContributionBody.parse(message.canonical_json())


def body(**changes: Any) -> ContributionBody:
    """The body of `report()`: what the ClientApp writes."""
    fields = {name: getattr(report(), name) for name in ContributionBody.model_fields}
    return ContributionBody(**{**fields, **changes})


def test_contribution_body_round_trips_exactly() -> None:
    message = body(run_id=U64_MAX)
    data = message.canonical_json()
    assert json.loads(data)["run_id"] == str(U64_MAX)
    assert ContributionBody.parse(data) == message
    assert ContributionBody.parse(data).canonical_json() == data


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"extra": 1}, MalformedError),
        ({"update_sha256": "B" * 64}, MalformedError),
        ({"round": 0}, MalformedError),  # Flower counts rounds from 1
        ({"examples": "100"}, MalformedError),
        ({"examples": (1 << 31) + 1}, MalformedError),
        ({"node_id": str(1 << 64)}, MalformedError),
        ({"node_id": 42}, MalformedError),  # u64 travels as a decimal string
        ({"dataset_fingerprint": "sha256:" + H}, MalformedError),  # the window file's form, not the report's
        ({"gradient_sha256": G}, MalformedError),  # one drift hash without the other
        ({"seq": "1"}, MalformedError),  # what only the agent adds when it signs
        ({"round_nonce": "0f" * 16}, MalformedError),
        ({"task_id": "x" * (MAX_CONTRIBUTION_BODY_BYTES + 1)}, TooLargeError),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else "",
)
def test_bad_contribution_bodies_are_refused(change: dict[str, Any], error: type[Exception]) -> None:
    doc = {**json.loads(body().canonical_json()), **change}
    with pytest.raises(error):
        ContributionBody.parse(json.dumps(doc).encode())


def test_strict_json_does_not_coerce_strings_to_numbers() -> None:
    doc = json.loads(report().canonical_json())
    doc["examples"] = "512"
    with pytest.raises(ValidationError):
        ContributionReport.model_validate_json(json.dumps(doc), strict=True)


def test_models_are_frozen() -> None:
    with pytest.raises(ValidationError):
        report().seq = 1  # type: ignore[misc]


@pytest.mark.parametrize("bias", [-1001, 1001, 0.5, "0.5"])
def test_knob_bias_is_integer_milli_units_within_bounds(bias: object) -> None:
    with pytest.raises(ValidationError):
        KnobUpdate(seq=1, device_time_ms=NOW, bias_milli=bias)  # type: ignore[arg-type]


def test_knob_bias_bounds_are_inclusive() -> None:
    assert KnobUpdate(seq=1, device_time_ms=NOW, bias_milli=1000).bias_milli == 1000
    assert KnobUpdate(seq=1, device_time_ms=NOW, bias_milli=-1000).bias_milli == -1000


def test_statement_total_must_equal_the_sum_of_its_lines() -> None:
    statement = next(m for m in SAMPLES if isinstance(m, Statement))
    with pytest.raises(ValidationError, match="total_minor"):
        Statement(**{**statement.model_dump(), "total_minor": 1201})


def test_revenue_report_needs_a_forward_period_and_integer_money() -> None:
    report = next(m for m in SAMPLES if isinstance(m, RevenueReport))
    with pytest.raises(ValidationError, match="period_end_ms"):
        RevenueReport(**{**report.model_dump(), "period_end_ms": report.period_start_ms})
    with pytest.raises(ValidationError):
        RevenueReport(**{**report.model_dump(), "amount_minor": 1.5})
    with pytest.raises(ValidationError):
        RevenueReport(**{**report.model_dump(), "amount_minor": -1})


def test_statement_request_needs_a_forward_period_and_a_nonce() -> None:
    request = next(m for m in SAMPLES if isinstance(m, StatementRequest))
    with pytest.raises(ValidationError, match="period_end_ms"):
        StatementRequest(**{**request.model_dump(), "period_end_ms": request.period_start_ms})
    with pytest.raises(ValidationError):
        StatementRequest(**{**request.model_dump(), "nonce": "AB" * 16})


def test_statement_money_is_integer() -> None:
    with pytest.raises(ValidationError):
        StatementLine(kind="royalty", amount_minor=1.5)  # type: ignore[arg-type]


def test_strike_needs_a_target_and_a_forward_span() -> None:
    with pytest.raises(ValidationError, match="target"):
        StrikeVote(seq=1, device_time_ms=NOW, start_ms=NOW)
    with pytest.raises(ValidationError, match="end_ms"):
        StrikeVote(seq=1, device_time_ms=NOW, target_purpose="ads", start_ms=NOW, end_ms=NOW)


def test_invitation_deadline_after_issue() -> None:
    invitation = SAMPLES[6]
    with pytest.raises(ValidationError, match="deadline"):
        RoundInvitation(**{**invitation.model_dump(), "deadline_ms": NOW})


def test_consent_lists_have_no_duplicates() -> None:
    with pytest.raises(ValidationError, match="duplicates"):
        ConsentPolicy(seq=1, device_time_ms=NOW, allowed_purposes=("a", "a"))


def test_a_v2_payload_is_refused_by_the_v1_model() -> None:
    doc = json.loads(KnobUpdate(seq=1, device_time_ms=NOW, bias_milli=0).canonical_json())
    doc["v"] = 2
    verified = open_envelope(
        seal(KnobUpdate.PAYLOAD_TYPE, json.dumps(doc).encode(), DEVICE),
        KeyRing([DEVICE.verifier]),
        KnobUpdate.PAYLOAD_TYPE,
    )
    with pytest.raises(MalformedError):
        decode(verified, KnobUpdate)


def test_require_newer_seq_is_strict() -> None:
    require_newer_seq(None, 0, "aa")
    require_newer_seq(4, 5, "aa")
    for seq in (4, 3, 0):
        with pytest.raises(ReplayedError) as info:
            require_newer_seq(4, seq, "aa")
        assert info.value.details == {"key_id": "aa", "last": 4, "found": seq}


def test_enrolment_request_proves_possession_of_its_key() -> None:
    request = SAMPLES[0]
    verified, parsed = open_enrolment_request(request.seal(DEVICE))
    assert parsed == request
    assert verified.signer == DEVICE.verifier


def test_enrolment_request_signed_by_another_key_is_refused() -> None:
    with pytest.raises(BadSignatureError):
        open_enrolment_request(SAMPLES[0].seal(MID))


def test_enrolment_request_with_tampered_payload_is_refused() -> None:
    envelope = json.loads(SAMPLES[0].seal(DEVICE))
    other = EnrolmentRequest(**{**SAMPLES[0].model_dump(), "device": "dev-2"})
    envelope["payload"] = json.loads(other.seal(MID))["payload"]
    with pytest.raises(BadSignatureError):
        open_enrolment_request(json.dumps(envelope).encode())


def test_enrolment_request_with_a_broken_key_text_is_malformed() -> None:
    bad = EnrolmentRequest(**{**SAMPLES[0].model_dump(), "device_key": "not-a-key"})
    with pytest.raises(MalformedError):
        open_enrolment_request(bad.seal(DEVICE))


def test_other_types_are_not_enrolment_requests() -> None:
    with pytest.raises(WrongTypeError):
        open_enrolment_request(SAMPLES[3].seal(DEVICE))


@settings(max_examples=200, deadline=None)
@given(seq=st.integers(0, U64_MAX), bias=st.integers(-1000, 1000), ms=st.integers(MIN_TIME_MS, MAX_TIME_MS))
def test_property_knob_update_round_trips_through_the_wire(seq: int, bias: int, ms: int) -> None:
    message = KnobUpdate(seq=seq, device_time_ms=ms, bias_milli=bias)
    verified = open_envelope(message.seal(DEVICE), KeyRing([DEVICE.verifier]), KnobUpdate.PAYLOAD_TYPE)
    assert decode(verified, KnobUpdate) == message


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=512))
def test_property_arbitrary_verified_payloads_decode_or_are_malformed(data: bytes) -> None:
    verified = open_envelope(
        seal(Heartbeat.PAYLOAD_TYPE, data, DEVICE), KeyRing([DEVICE.verifier]), Heartbeat.PAYLOAD_TYPE
    )
    with pytest.raises(MalformedError):
        decode(verified, Heartbeat)


@pytest.mark.parametrize(
    "spelling",
    [
        lambda doc: json.dumps(doc, sort_keys=True),  # whitespace
        lambda doc: json.dumps(dict(reversed(list(doc.items()))), separators=(",", ":")),  # key order
        lambda doc: (
            json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"bias_milli":1000}'
        ),  # duplicate key, last wins in pydantic
    ],
)
def test_payloads_must_be_in_canonical_form(spelling: Any) -> None:
    message = KnobUpdate(seq=7, device_time_ms=NOW, bias_milli=-5)
    doc = json.loads(message.canonical_json())
    payload = spelling(doc).encode()
    assert payload != message.canonical_json()
    verified = open_envelope(
        seal(KnobUpdate.PAYLOAD_TYPE, payload, DEVICE), KeyRing([DEVICE.verifier]), KnobUpdate.PAYLOAD_TYPE
    )
    with pytest.raises(MalformedError):
        decode(verified, KnobUpdate)


def test_non_ascii_text_is_canonical_as_literal_utf8() -> None:
    line = StatementLine(kind="royalty", amount_minor=5, memo="Zürich café")
    statement = Statement(
        mid="mid-a",
        member="m-1",
        currency="CHF",
        period_start_ms=NOW,
        period_end_ms=NOW + 1,
        lines=(line,),
        total_minor=5,
        checkpoint_size=1,
        issued_ms=NOW,
    )
    assert "Zürich".encode() in statement.canonical_json()
    verified = open_envelope(statement.seal(MID), KeyRing([MID.verifier]), Statement.PAYLOAD_TYPE)
    assert decode(verified, Statement) == statement
    escaped = json.dumps(json.loads(statement.canonical_json()), sort_keys=True, separators=(",", ":")).encode()
    verified = open_envelope(
        seal(Statement.PAYLOAD_TYPE, escaped, MID), KeyRing([MID.verifier]), Statement.PAYLOAD_TYPE
    )
    with pytest.raises(MalformedError, match="canonical"):
        decode(verified, Statement)


finite = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(loss_before=finite, loss_after=finite, seconds=finite, seq=st.integers(0, U64_MAX), memo=st.text(max_size=40))
def test_property_floats_and_text_survive_the_canonical_round_trip(
    loss_before: float, loss_after: float, seconds: float, seq: int, memo: str
) -> None:
    # decode refuses non-canonical payloads, so a float or string that re-encoded differently would fail here.
    message = report(loss_before=loss_before, loss_after=loss_after, seconds=seconds, seq=seq)
    verified = open_envelope(message.seal(DEVICE), KeyRing([DEVICE.verifier]), ContributionReport.PAYLOAD_TYPE)
    assert decode(verified, ContributionReport) == message
    line = StatementLine(kind="adjustment", amount_minor=0, memo=memo)
    assert StatementLine.model_validate_json(line.model_dump_json(), strict=True) == line


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8
)


@settings(max_examples=400, deadline=None)
@given(index=st.integers(0, len(SAMPLES) - 1), data=st.data())
def test_property_any_field_replaced_by_any_json_value_decodes_or_is_malformed(index: int, data: st.DataObject) -> None:
    message = SAMPLES[index]
    doc = json.loads(message.canonical_json())
    field = data.draw(st.sampled_from(sorted(doc)))
    doc[field] = data.draw(json_values)
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    verified = open_envelope(seal(message.PAYLOAD_TYPE, payload, MID), KeyRing([MID.verifier]), message.PAYLOAD_TYPE)
    try:
        decoded = decode(verified, type(message))
    except MalformedError:
        return
    assert decoded.canonical_json() == payload


_JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)


@given(st.recursive(_JSON_LEAF, lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=30))
@settings(max_examples=300, deadline=None)
def test_canonical_encoder_is_json_dumps_with_the_canonical_options(doc: object) -> None:
    from protocol.messages import canonical_text

    assert canonical_text(doc) == json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def test_canonical_encoder_refuses_what_json_dumps_refuses() -> None:
    from protocol.messages import canonical_text

    for bad in [float("nan"), {"x": float("inf")}, {"b": b"bytes"}, {1: object()}]:
        with pytest.raises((ValueError, TypeError)):
            canonical_text(bad)
