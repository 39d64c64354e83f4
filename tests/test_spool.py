"""The spool (edge/federated/spool.py), both sides: the ClientApp writes a ContributionBody atomically under its run,
round and node; the agent reads it (size first, strict schema), signs it with the nonce of its invitation to the
body's run, commits it to the outbox under the file's name and only then deletes the file; whatever it cannot sign is
moved to `rejected/` with the reason. The signed bytes verify and decode at the coordinator as the one
ContributionReport."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from mqtt_fixtures import contribution_body, signed_invitation
from test_agent_member_controls import _membership

from edge.agent.config import AgentSettings
from edge.agent.daemon import MembershipRunner
from edge.federated.spool import (
    pending_files,
    read_record,
    reject_file,
    spool_name,
    write_body,
)
from protocol.envelope import KeyRing, decode, open_envelope
from protocol.errors import MalformedError, Reason, TooLargeError
from protocol.identity import SignerKey
from protocol.messages import MAX_CONTRIBUTION_BODY_BYTES, ContributionBody, ContributionReport, DpParams

NONCE = "0123456789abcdef0123456789abcdef"
GRADIENT, OFFSET = "d" * 64, "e" * 64
KEY = SignerKey.generate("device-a")
NOW_MS = 1_800_000_000_000


BIG_RUN = (1 << 63) + 5  # above int64: must survive as a decimal string


def _nonces(run_id: int) -> str | None:
    """The agent's invitation nonces (edge.agent.job_node.JobNode.nonce_for): one invitation, to BIG_RUN."""
    return NONCE if run_id == BIG_RUN else None


def _body(**changes: object) -> ContributionBody:
    return contribution_body(
        1,
        "device-a",
        **{"run_id": BIG_RUN, "node_id": 12_345_678_901_234_567_890, "round": 2, **changes},  # type: ignore[arg-type]
    )


def test_the_clientapp_writes_the_body_and_the_coordinator_decodes_what_the_agent_signed(tmp_path: Path) -> None:
    body = _body(dp=DpParams(clipping_norm=1.0, noise_multiplier=0.5))
    path = write_body(tmp_path, body)
    assert path.name == f"run{BIG_RUN}-round000002-node12345678901234567890.json" == spool_name(body)
    assert path.read_bytes() == body.canonical_json()
    assert json.loads(path.read_bytes())["run_id"] == str(BIG_RUN)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    assert path.stat().st_mode & 0o077 == 0

    record = read_record(path, _nonces)
    assert (record.body, record.round_nonce) == (body, NONCE)
    envelope = record.seal(KEY, 7, NOW_MS)
    assert json.loads(envelope)["payloadType"] == ContributionReport.PAYLOAD_TYPE
    report = decode(
        open_envelope(envelope, KeyRing([KEY.verifier]), ContributionReport.PAYLOAD_TYPE), ContributionReport
    )
    assert report == ContributionReport.from_body(body, seq=7, device_time_ms=NOW_MS, round_nonce=NONCE)
    assert (report.run_id, report.node_id, report.seq, report.v) == (BIG_RUN, 12_345_678_901_234_567_890, 7, 2)
    assert (report.gradient_sha256, report.drift_offset_sha256) == (None, None)


def test_a_drift_corrected_body_carries_both_hashes_into_the_report(tmp_path: Path) -> None:
    path = write_body(tmp_path, _body(gradient_sha256=GRADIENT, drift_offset_sha256=OFFSET))
    envelope = read_record(path, _nonces).seal(KEY, 8, NOW_MS)
    report = decode(
        open_envelope(envelope, KeyRing([KEY.verifier]), ContributionReport.PAYLOAD_TYPE), ContributionReport
    )
    assert (report.gradient_sha256, report.drift_offset_sha256) == (GRADIENT, OFFSET)


def test_a_later_body_of_the_same_round_replaces_the_unread_one(tmp_path: Path) -> None:
    write_body(tmp_path, _body(update_sha256="a" * 64))
    path = write_body(tmp_path, _body(update_sha256="b" * 64))
    assert pending_files(tmp_path, 10) == [path]
    assert read_record(path, _nonces).body.update_sha256 == "b" * 64


def test_pending_files_are_complete_bodies_oldest_name_first(tmp_path: Path) -> None:
    paths = [write_body(tmp_path, _body(round=r)) for r in (3, 1, 2)]
    (tmp_path / f".{paths[0].name}.123.tmp").write_bytes(b"{")  # a ClientApp still writing
    (tmp_path / "rejected").mkdir()
    assert pending_files(tmp_path, 10) == sorted(paths)
    assert pending_files(tmp_path, 2) == sorted(paths)[:2]
    assert pending_files(tmp_path / "missing", 10) == []


def test_a_body_of_a_run_no_invitation_named_is_refused(tmp_path: Path) -> None:
    path = write_body(tmp_path, _body(run_id=8))
    with pytest.raises(MalformedError, match="no job invitation") as err:
        read_record(path, _nonces)
    assert err.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[]",
        b'{"update_sha256": "not-a-hash"}',
        _body().canonical_json().replace(b'"round":2', b'"round":0'),  # Flower counts rounds from 1
        _body().canonical_json()[:-1] + b',"seq":"1"}',  # what only the agent adds
        _body().canonical_json()[:-1] + b',"type":"application/vnd.midgate.contribution.v1+json"}',  # retired record
    ],
    ids=["not-json", "array", "bad-hash", "round-0", "agent-field", "retired-record"],
)
def test_a_file_that_is_not_a_valid_body_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "run1-round000001-node1.json"
    path.write_bytes(content)
    with pytest.raises(MalformedError) as err:
        read_record(path, _nonces)
    assert err.value.reason is Reason.MALFORMED


def test_a_file_too_large_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (MAX_CONTRIBUTION_BODY_BYTES + 1))
    with pytest.raises(TooLargeError) as err:
        read_record(path, _nonces)
    assert err.value.details == {"limit": MAX_CONTRIBUTION_BODY_BYTES, "found": MAX_CONTRIBUTION_BODY_BYTES + 1}


def test_a_refused_file_moves_to_rejected_with_its_reason(tmp_path: Path) -> None:
    path = write_body(tmp_path, _body(run_id=8))
    with pytest.raises(MalformedError) as err:
        read_record(path, _nonces)
    reject_file(path, err.value)
    assert pending_files(tmp_path, 10) == []
    assert (tmp_path / "rejected" / path.name).read_bytes() == _body(run_id=8).canonical_json()
    assert "malformed" in (tmp_path / "rejected" / f"{path.name}.error").read_text()


def test_the_agent_takes_each_body_into_its_outbox_once_and_deletes_it_only_after_the_commit(tmp_path: Path) -> None:
    membership, mid_key = _membership(tmp_path / "mids" / "riverside")
    settings = AgentSettings(data_dir=tmp_path, spool_dir=tmp_path / "spool")
    runner = MembershipRunner(settings, membership)
    spool = settings.spool_root / "riverside"
    try:
        asyncio.run(runner.job_node.invited(signed_invitation(mid_key, "job-1", 7, nonce=NONCE)))
        taken = write_body(spool, contribution_body(0, run_id=7))
        stray = write_body(spool, contribution_body(1, run_id=8))  # no invitation named run 8
        assert runner._take_spool(spool) == 1
        assert not taken.exists() and pending_files(spool, 10) == []
        assert (spool / "rejected" / f"{stray.name}.error").exists()
        (item,) = runner.outbox.due(NOW_MS * 2, 10)
        report = decode(
            open_envelope(item.envelope, KeyRing([membership.key.verifier]), ContributionReport.PAYLOAD_TYPE),
            ContributionReport,
        )
        expected = ContributionReport.from_body(
            contribution_body(0, run_id=7), seq=item.seq, device_time_ms=report.device_time_ms, round_nonce=NONCE
        )
        assert report == expected

        # A crash between the outbox commit and the unlink leaves the file behind: the next pass only deletes it.
        write_body(spool, contribution_body(0, run_id=7))
        assert runner._take_spool(spool) == 0
        assert pending_files(spool, 10) == [] and len(runner.outbox.due(NOW_MS * 2, 10)) == 1
    finally:
        runner.outbox.close()
