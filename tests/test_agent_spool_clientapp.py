"""The agent reads the Flower ClientApp's own record format (protocol.tasks.contribution) from the spool: translated
into ContributionReport fields with the nonce of the MID's job invitation; without an invitation, or with a record
that does not make a valid report, it is refused with a reason code and nothing is taken. A record of a drift-corrected
job (gradient and offset hashes) is signed as ContributionReportV2, any other as v1, exactly as before v2 existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge.agent.spool import build_report, read_record, sign_report
from protocol.envelope import KeyRing, decode, open_envelope
from protocol.errors import MalformedError, Reason
from protocol.identity import SignerKey
from protocol.messages import ContributionReport, ContributionReportV2
from protocol.tasks.contribution import ContributionRecord, parse_contribution_record

NONCE = "0123456789abcdef0123456789abcdef"
GRADIENT, OFFSET = "d" * 64, "e" * 64
KEY = SignerKey.generate("device-a")


def _clientapp_record(tmp_path: Path, **overrides: object) -> Path:
    record = ContributionRecord(
        run_id=(1 << 63) + 5,  # above int64: must survive as a decimal string
        round=2,
        node_id=12_345_678_901_234_567_890,
        task_id="plaid-appliance",
        task_version=1,
        global_model_sha256="a" * 64,
        update_sha256="b" * 64,
        examples=38,
        dataset_fingerprint="merkle-sha256:" + "c" * 64,
        loss_before=2.4,
        loss_after=2.2,
        seconds=2.7,
        created_ms=1_795_680_717_827,
    )
    doc = {**json.loads(record.to_json_bytes()), **overrides}
    path = tmp_path / "run-1-round-2-node-3.contribution.json"
    path.write_text(json.dumps(doc))
    parse_contribution_record(record.to_json_bytes())  # what the ClientApp writes is a valid record
    return path


def test_clientapp_record_becomes_a_report_with_the_invitation_nonce(tmp_path: Path) -> None:
    spooled = read_record(_clientapp_record(tmp_path), NONCE)
    report = build_report(spooled.fields, 7, 1_800_000_000_000)
    assert report.run_id == (1 << 63) + 5 and report.node_id == 12_345_678_901_234_567_890
    assert json.loads(report.canonical_json())["run_id"] == str((1 << 63) + 5)
    assert report.round == 2 and report.round_nonce == NONCE
    assert report.dataset_fingerprint == "c" * 64
    assert (report.global_model_sha256, report.update_sha256) == ("a" * 64, "b" * 64)


def test_clientapp_record_without_an_invitation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MalformedError) as err:
        read_record(_clientapp_record(tmp_path), None)
    assert err.value.reason is Reason.MALFORMED


def test_clientapp_record_with_a_bad_hash_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MalformedError):
        read_record(_clientapp_record(tmp_path, update_sha256="not-a-hash"), NONCE)


def test_a_record_without_drift_hashes_is_signed_as_v1_byte_for_byte(tmp_path: Path) -> None:
    spooled = read_record(_clientapp_record(tmp_path), NONCE)
    assert "gradient_sha256" not in spooled.fields and "drift_offset_sha256" not in spooled.fields
    envelope = sign_report(spooled.fields, KEY, 7, 1_800_000_000_000)
    verified = open_envelope(envelope, KeyRing([KEY.verifier]), ContributionReport.PAYLOAD_TYPE)
    report = decode(verified, ContributionReport)
    assert report == ContributionReport(**spooled.fields, seq=7, device_time_ms=1_800_000_000_000)
    assert verified.payload == report.canonical_json() and b"drift" not in verified.payload


def test_a_drift_corrected_record_is_signed_as_v2_with_both_hashes(tmp_path: Path) -> None:
    path = _clientapp_record(tmp_path, gradient_sha256=GRADIENT, drift_offset_sha256=OFFSET)
    spooled = read_record(path, NONCE)
    report = build_report(spooled.fields, 7, 1_800_000_000_000)
    assert isinstance(report, ContributionReportV2)
    assert (report.gradient_sha256, report.drift_offset_sha256) == (GRADIENT, OFFSET)
    assert (report.run_id, report.update_sha256, report.round_nonce) == ((1 << 63) + 5, "b" * 64, NONCE)
    envelope = sign_report(spooled.fields, KEY, 7, 1_800_000_000_000)
    assert json.loads(envelope)["payloadType"] == ContributionReportV2.PAYLOAD_TYPE
    verified = open_envelope(envelope, KeyRing([KEY.verifier]), ContributionReportV2.PAYLOAD_TYPE)
    assert decode(verified, ContributionReportV2) == report


@pytest.mark.parametrize(
    "hashes",
    [
        {"gradient_sha256": GRADIENT, "drift_offset_sha256": None},
        {"gradient_sha256": None, "drift_offset_sha256": OFFSET},
        {"gradient_sha256": GRADIENT, "drift_offset_sha256": "not-a-hash"},
    ],
)
def test_a_record_with_half_or_bad_drift_hashes_is_refused(tmp_path: Path, hashes: dict[str, object]) -> None:
    with pytest.raises(MalformedError) as err:
        read_record(_clientapp_record(tmp_path, **hashes), NONCE)
    assert err.value.reason is Reason.MALFORMED
