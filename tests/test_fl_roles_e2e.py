"""End to end through midgate's roles: Mosquitto + `coordinator serve` (with its SuperLink) + 3 enrolled
`agent run`s on PLAID replay windows. The MID invites the devices (signed RoundInvitation on down/invite), each agent
starts its SuperNode, a 2-round job runs on the SuperLink, and every round's contribution record goes ClientApp ->
spool -> agent outbox (signed) -> MQTT -> coordinator ledger -> receipt verified by the agent; each ledger report
names exactly the update the strategy received from that node (check_contribution)."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from flower_fixtures import APP_DIR, plaid_windows, split_by_label
from mqtt_fixtures import AgentHandle, MessagingStack, agent_toml, free_port, wait_until

from coordinator.federation.capture import CaptureDirectory
from coordinator.federation.job import JobOutcome
from coordinator.federation.report_check import check_contribution
from coordinator.federation.superlink import FlowerCli, kill_pids
from coordinator.registry.enrolment import load_or_create_mid_key
from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from protocol.envelope import peek_envelope
from protocol.messages import RoundInvitation
from protocol.tasks.contribution import ContributionRecord
from protocol.tasks.windows import save_window_file
from protocol.topics import DownKind, down_topic

pytest_plugins = ["mqtt_fixtures"]


def _flower_pids(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if "fl" in p.name()]
    except psutil.Error:
        return []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_round_job_reports_reach_the_ledger_and_match_the_strategys_updates(
    messaging_stack: MessagingStack, tmp_path: Path
) -> None:
    stack = messaging_stack
    stack.start_broker()
    link_port = free_port()
    stack.coordinator_extra = f"[federation]\nenabled = true\nport = {link_port}\n"
    stack.start_coordinator()
    train = plaid_windows("train")
    agents = []
    for i, windows in enumerate(split_by_label(train, 3, seed=1)):
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
    for handle, _ in agents:
        wait_until(
            lambda h=handle: f"Received PUBLISH from {h.device}" in stack.broker.log_text(),  # type: ignore[misc, union-attr]
            60,
            f"agent {handle.name} connected",
        )

    mid_key = load_or_create_mid_key(stack.data_dir / "mid.key", stack.mid)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-mid-jobs")
    publisher.connect("127.0.0.1", stack.broker.port)
    publisher.loop_start()
    below: list[int] = []
    try:
        now = time.time_ns() // 1_000_000
        nonces = {}
        for _, record in agents:
            nonces[record.flower_node_id] = secrets.token_hex(16)
            invitation = RoundInvitation(
                job_id="job-1",
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
        run_id = cli.submit_run(
            APP_DIR,
            {
                "selected-nodes": " ".join(str(r.flower_node_id) for _, r in agents),
                "validation-path": str(validation),
                "output-dir": str(tmp_path / "jobs"),
                "num-rounds": 2,
                "local-epochs": 1,
            },
        )
        status = cli.wait_finished(run_id, timeout=200)
        assert status == "finished:completed"
        run_dir = tmp_path / "jobs" / f"run-{run_id}"
        wait_until(lambda: (run_dir / "outcome.json").exists(), 30, "the ServerApp's outcome")
        outcome = JobOutcome.read(run_dir)
        assert outcome.status == "finished" and outcome.rounds_completed == 2 and outcome.drops == []

        # Every round's report of every node is in the ledger and receipted back to its agent.
        wait_until(
            lambda: all(h.outbox_counts()[0] == 0 and h.outbox_counts()[1] >= 2 for h, _ in agents),
            120,
            "every report receipted",
        )
        captures = CaptureDirectory(run_dir)
        by_node = {r.flower_node_id: r for _, r in agents}
        seen = set()
        for _, _, envelope in stack.ledger_contributions():
            _, payload, _ = peek_envelope(envelope)
            fields = json.loads(payload)
            record = ContributionRecord.model_validate(
                {**{k: fields[k] for k in ContributionRecord.model_fields if k in fields}, "created_ms": 0},
                strict=False,
            )
            assert fields["round_nonce"] == nonces[record.node_id]  # the agent took it from the MID's invitation
            assert record.node_id in by_node
            check_contribution(record, captures.load_round(record.round))
            seen.add((record.node_id, record.round))
        assert seen == {(n, r) for n in by_node for r in (1, 2)}
        for handle, _ in agents:
            assert handle.process is not None and handle.process.proc is not None
            below += _flower_pids(handle.process.proc.pid)
    except BaseException:
        for log in sorted(tmp_path.glob("agent-*/data/mids/*/jobs/*/supernode.log")):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-3000:]}")
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
