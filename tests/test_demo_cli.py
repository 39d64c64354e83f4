"""`midgate demo` on real processes: Mosquitto, `coordinator serve` with its SuperLink, five `agent run` daemons,
the operator's, members' and buyer's commands. Checked from outside the demo: every number of its summary against
the ledger it leaves (read here with the protocol's decoders, not the demo's), the members' statements against the
ledger's payouts, and that no process it started outlives it, also when it is interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from mqtt_fixtures import PYTHON, REPO, wait_until

from coordinator.ledger.audit import audit_ledger
from coordinator.royalties.settlement import SplitRecord, decode_record
from protocol.envelope import peek_envelope
from protocol.identity import VerifierKey
from protocol.job_log import JobLogRecord, decode_job_record, decode_round_record
from protocol.leaves import LeafKind, decode_leaf
from protocol.messages import ContributionReport, EnrolmentRequest, StrikeVote

pytest_plugins = ["mqtt_fixtures"]

ROUNDS = 2
JOB = "job-1"
PAYMENT, REVENUE = 100_000, 40_000


def _demo(workdir: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [PYTHON, "-c", "from midgate_cli import app; app()", "demo", "--workdir", str(workdir), *extra]
    out = (workdir.parent / f"{workdir.name}.out").open("w")
    return subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


def _left_behind(workdir: Path) -> list[str]:
    """Every live process that runs in, or names, the demo's folder: what the demo started and did not stop."""
    found = []
    for proc in psutil.process_iter():
        try:
            cwd, cmdline = proc.cwd(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if str(workdir) in cwd or str(workdir) in cmdline:
            found.append(f"{proc.pid} {cmdline[:200]}")
    return found


def _ledger(workdir: Path) -> list[tuple[LeafKind, bytes]]:
    db = sqlite3.connect(f"file:{workdir / 'coordinator' / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT data FROM leaves ORDER BY idx").fetchall()
    finally:
        db.close()
    return [(leaf.kind, leaf.signed) for leaf in (decode_leaf(bytes(row[0])) for row in rows)]


def _signer(signed: bytes, devices: dict[str, str]) -> str:
    return devices[peek_envelope(signed)[2][0]]


def _one(records: list[SplitRecord]) -> SplitRecord:
    assert len(records) == 1, records
    return records[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_demos_summary_is_the_ledgers_and_it_leaves_no_process_behind(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = _demo(workdir, "--rounds", str(ROUNDS))
    assert demo.wait(timeout=840) == 0, (tmp_path / "demo.out").read_text()[-6000:]
    said = (tmp_path / "demo.out").read_text()
    assert "every outcome as expected" in said
    assert _left_behind(workdir) == []

    leaves = _ledger(workdir)
    devices: dict[str, str] = {}  # key id -> device, from the enrolment requests the ledger holds
    for kind, signed in leaves:
        if kind is LeafKind.ENROL:
            request = EnrolmentRequest.model_validate_json(peek_envelope(signed)[1])
            devices[VerifierKey.parse(request.device_key).key_id.hex()] = request.device
    [job] = [decode_job_record(signed) for kind, signed in leaves if kind is LeafKind.JOB]
    assert isinstance(job, JobLogRecord) and job.status == "completed" and job.rounds_completed == ROUNDS
    rounds = [decode_round_record(signed) for kind, signed in leaves if kind is LeafKind.ROUND]
    reports = [
        (_signer(signed, devices), ContributionReport.model_validate_json(peek_envelope(signed)[1]))
        for kind, signed in leaves
        if kind is LeafKind.CONTRIBUTION
    ]
    settlement = _one([decode_record(signed) for kind, signed in leaves if kind is LeafKind.SETTLEMENT])
    royalty = _one([decode_record(signed) for kind, signed in leaves if kind is LeafKind.ROYALTY])

    # Every captured update has its device's report in the ledger exactly once.
    captured = Counter(update.device for r in rounds for update in r.updates)
    assert Counter(device for device, report in reports if report.run_id == job.run_id) == captured
    assert len({(device, report.seq) for device, report in reports}) == len(reports)

    summary = json.loads((workdir / "summary.json").read_text())
    assert (summary["job_id"], summary["model_version"], summary["run_id"]) == (JOB, job.model_version, job.run_id)
    assert summary["ledger_size"] == len(leaves)
    selected = {d.device for d in job.devices if d.selected}
    values = {v.member: v for v in job.attribution}
    for line in summary["members"]:
        member, device = line["member"], line["device"]
        assert line["trained"] == (device in selected)
        assert line["contributions"] == captured.get(device, 0)
        value = values.get(member)
        assert line["value_units"] == (value.value_units if value else None)
        assert line["screens"] == (list(value.screens) if value else [])
        for split, key in ((settlement, "settlement_minor"), (royalty, "royalty_minor")):
            assert line[key] == sum(p.amount_minor for p in split.payouts if p.member == member)
        assert line["statement_verified"] is True
    roles = {line["role"]: line for line in summary["members"]}
    assert not roles["pauses"]["trained"] and roles["pauses"]["contributions"] == 0
    assert roles["free rider"]["trained"]

    for split, key, paid in ((settlement, "settlement", PAYMENT), (royalty, "royalty", REVENUE)):
        members = sum(p.amount_minor for p in split.payouts)
        assert summary[key] == {
            "index": summary[key]["index"],
            "record_id": split.inputs.record_id,
            "payment_minor": paid,
            "fee_minor": split.fee_minor,
            "members_minor": members,
            "unallocated_minor": split.unallocated_minor,
        }
        assert split.inputs.payment_minor == paid == split.fee_minor + members + split.unallocated_minor
        assert members * 10 >= paid * 7
        assert split.inputs.attribution.model_version == job.model_version

    # The striking member's signed vote, as a STRIKE leaf.
    [strike] = [
        (_signer(s, devices), StrikeVote.model_validate_json(peek_envelope(s)[1]))
        for k, s in leaves
        if k is LeafKind.STRIKE
    ]
    assert (strike[1].target_buyer, strike[1].target_purpose) == ("acme", "advertising")
    assert summary["strikes"][0]["device"] == strike[0]

    # Each member's agent printed the lines the ledger pays it, and refused the one the operator changed.
    logs = workdir / "logs"
    for line in summary["members"]:
        statement = (logs / f"statement-{line['member']}.log").read_text()
        printed = [int(n) for n in re.findall(r": (\d+) EUR minor units \(", statement)]
        owed = [line["settlement_minor"], line["royalty_minor"]] if line["trained"] else []
        assert printed == owed, statement
    tampered = (logs / "statement-household-1-tampered.log").read_text()
    assert "statement refused: root_mismatch" in tampered and "Total" not in tampered

    # The restored ledger audits with the MID's key, and the accuracy lines name the central baseline.
    audit_ledger(workdir / "coordinator" / "ledger.sqlite", VerifierKey.parse((workdir / "mid.vkey").read_text()))
    accuracy = summary["accuracy"]
    assert accuracy["federated"] == pytest.approx(job.final_validation["accuracy"])
    assert accuracy["central_recipe_budget"]["epochs"] == 60 and accuracy["central_same_budget"]["epochs"] == ROUNDS


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = _demo(workdir)
    try:
        # Interrupt it while the job runs: broker, serve, five agents and the devices' Flower processes are up.
        wait_until(lambda: "round 1/" in _text(workdir / "logs" / "job-start.log"), 400, "the job's first round")
        running = psutil.Process(demo.pid).children(recursive=True)
        assert len(running) >= 10, [p.cmdline() for p in running]
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=120) == 130
    finally:
        if demo.poll() is None:
            demo.kill()
    said = (tmp_path / "demo.out").read_text()
    assert "interrupted" in said and "stopped agent-household-1" in said
    deadline = time.monotonic() + 10  # processes SIGKILLed last are reaped by init just after
    while _left_behind(workdir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _left_behind(workdir) == []


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""
