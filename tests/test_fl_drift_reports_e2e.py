"""Issue 6 with drift correction, real processes: a drift-corrected job's contribution reports reach the ledger.
Mosquitto + `coordinator serve` (with its SuperLink, so every report is cross-checked with the strategy's round
captures) + 2 enrolled `agent run`s with SuperNodes, a 2-round job with run config `drift-correction = 1.0`
(invitations and `flwr run` as in tests/test_fl_update_mismatch_e2e.py: `job start` has no drift option). Each
ClientApp record names the gradient and drift-offset hashes of its round, so each agent signs a ContributionReportV2;
the coordinator logs and receipts every one, and every ledger report names exactly the update, gradient and offset the
strategy captured from that node. Before v2 the agent refused these records, and nothing of such a job was logged."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from flower_fixtures import APP_DIR, plaid_windows, split_by_label
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, agent_toml, free_port, wait_until

from coordinator.federation.capture import CaptureDirectory
from coordinator.federation.job import JobOutcome
from coordinator.federation.report_check import check_contribution
from coordinator.federation.superlink import FlowerCli, kill_pids
from coordinator.registry.enrolment import load_or_create_mid_key
from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from protocol.envelope import peek_envelope
from protocol.messages import ContributionReportV2, RoundInvitation
from protocol.tasks.contribution import ContributionRecord
from protocol.tasks.windows import save_window_file
from protocol.topics import DownKind, down_topic

pytest_plugins = ["mqtt_fixtures"]

ROUNDS = 2


def _flower_pids(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if "fl" in p.name()]
    except psutil.Error:
        return []


def _flags(config: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        [PYTHON, "-c", "from midgate_cli import app; app()", "coordinator", "flags", "--json", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_drift_corrected_jobs_reports_are_signed_as_v2_and_reach_the_ledger(
    messaging_stack: MessagingStack, tmp_path: Path
) -> None:
    stack = messaging_stack
    stack.start_broker()
    link_port = free_port()
    stack.coordinator_extra = f"[federation]\nenabled = true\nport = {link_port}\n"
    stack.start_coordinator()
    agents = []
    for i, windows in enumerate(split_by_label(plaid_windows("train"), 2, seed=1)):
        name = f"m{i}"
        workdir = tmp_path / f"agent-{name}"
        workdir.mkdir()
        save_window_file(workdir / "windows.npz", windows)
        config = workdir / "agent.toml"
        config.write_text(agent_toml(workdir / "data", f'training_windows = "{workdir / "windows.npz"}"'))
        record = enrol(AgentSettings.load(config), f"http://127.0.0.1:{stack.http_port}", stack.invite(name))
        assert record.flower_node_id != 0
        handle = AgentHandle(name, workdir)
        handle.mid, handle.device = record.mid, record.device
        stack.agents.append(handle)
        stack.start_agent(handle)
        agents.append((handle, record))
    assert stack.broker is not None
    broker = stack.broker
    for handle, _ in agents:
        wait_until(
            lambda h=handle: f"Received PUBLISH from {h.device}" in broker.log_text(),  # type: ignore[misc]
            60,
            f"agent {handle.name} connected",
        )

    mid_key = load_or_create_mid_key(stack.data_dir / "mid.key", stack.mid)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-mid-jobs")
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    below: list[int] = []
    try:
        now = time.time_ns() // 1_000_000
        nonces = {}
        for _, record in agents:
            nonces[record.flower_node_id] = secrets.token_hex(16)
            invitation = RoundInvitation(
                job_id="job-drift",
                run_id=0,
                round=1,
                task_id="plaid-appliance",
                task_version=1,
                purpose="research",
                buyer="acme",
                nonce=nonces[record.flower_node_id],
                issued_ms=now,
                deadline_ms=now + 240_000,
            ).seal(mid_key)
            publisher.publish(
                down_topic(stack.mid, record.device, DownKind.INVITE), invitation, qos=1
            ).wait_for_publish(10)
        for handle, _ in agents:
            assert handle.process is not None and handle.process.proc is not None
            wait_until(lambda h=handle: "supernode started" in h.process.log_text(), 60, f"{handle.name} SuperNode")  # type: ignore[misc, union-attr]

        ca = stack.data_dir / "broker" / "tls" / "ca.crt"
        cli = FlowerCli(tmp_path / "flwr-cli", f"127.0.0.1:{link_port}", ca)
        cli.write_config()
        validation = tmp_path / "validation.npz"
        save_window_file(validation, plaid_windows("test"))
        # The coordinator cross-checks reports with the captures under its `[federation] jobs_dir` (default).
        jobs_dir = stack.data_dir / "federation" / "jobs"
        run_id = cli.submit_run(
            APP_DIR,
            {
                "selected-nodes": " ".join(str(r.flower_node_id) for _, r in agents),
                "validation-path": str(validation),
                "output-dir": str(jobs_dir),
                "num-rounds": ROUNDS,
                "local-epochs": 1,
                "drift-correction": 1.0,
            },
        )
        status = cli.wait_finished(run_id, timeout=200)
        assert status == "finished:completed"
        run_dir = jobs_dir / f"run-{run_id}"
        wait_until(lambda: (run_dir / "outcome.json").exists(), 30, "the ServerApp's outcome")
        outcome = JobOutcome.read(run_dir)
        assert outcome.status == "finished" and outcome.rounds_completed == ROUNDS and outcome.drops == []

        # Every round's report of every node is in the ledger and receipted back to its agent; the agents refused no
        # record (they did, for every record of such a job, before ContributionReportV2).
        wait_until(
            lambda: all(h.outbox_counts()[0] == 0 and h.outbox_counts()[1] >= ROUNDS for h, _ in agents),
            120,
            "every report receipted",
        )
        for handle, _ in agents:
            assert not list((handle.spool / "rejected").glob("*.json")), f"{handle.name} refused a record"
        captures = CaptureDirectory(run_dir)
        by_node = {r.flower_node_id: r for _, r in agents}
        seen = set()
        for _, _, envelope in stack.ledger_contributions():
            payload_type, payload, _ = peek_envelope(envelope)
            assert payload_type == ContributionReportV2.PAYLOAD_TYPE
            report = ContributionReportV2.model_validate_json(payload)
            assert report.gradient_sha256 is not None and report.drift_offset_sha256 is not None
            assert report.round_nonce == nonces[report.node_id] and report.node_id in by_node
            fields = json.loads(payload)
            record = ContributionRecord.model_validate(
                {**{k: fields[k] for k in ContributionRecord.model_fields if k in fields}, "created_ms": 0},
                strict=False,
            )
            capture = captures.load_round(report.round)
            assert all(u.gradient_sha256 is not None for u in capture.updates)  # the round was drift-corrected
            update = check_contribution(record, capture)  # update, gradient and offset hashes all as captured
            assert (update.gradient_sha256, update.drift_offset_sha256) == (
                report.gradient_sha256,
                report.drift_offset_sha256,
            )
            seen.add((report.node_id, report.round))
        assert seen == {(n, r) for n in by_node for r in range(1, ROUNDS + 1)}
        assert _flags(stack.config) == []
        for handle, _ in agents:
            assert handle.process is not None and handle.process.proc is not None
            below += _flower_pids(handle.process.proc.pid)
    except BaseException:
        for log in sorted(tmp_path.glob("agent-*/data/mids/*/jobs/*/supernode.log")):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-3000:]}")
        for rejected in sorted(tmp_path.glob("agent-*/data/spool/*/rejected/*.error")):
            print(f"---- {rejected} ----\n{rejected.read_text(errors='replace')}")
        for log in sorted((stack.data_dir / "federation").glob("**/*.log")):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        for handle, _ in agents:
            if handle.process is not None and handle.process.proc is not None:
                below += _flower_pids(handle.process.proc.pid)
                handle.process.stop()
        kill_pids(below, 5.0)
