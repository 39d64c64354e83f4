"""End to end through midgate's roles: Mosquitto + `coordinator serve` (with its SuperLink) + 3 enrolled
`agent run`s on PLAID replay windows. `midgate coordinator job start` invites the devices (signed RoundInvitation on
down/invite), each agent starts its SuperNode, the command runs a 2-round job on the SuperLink, and every round's
contribution record goes ClientApp -> spool -> agent outbox (signed) -> MQTT -> coordinator ledger -> receipt verified
by the agent; each ledger report names exactly the update the strategy received from that node (check_contribution)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import psutil
import pytest
from flower_fixtures import plaid_windows, split_by_label
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, ServiceProcess, agent_toml, free_port, wait_until

from coordinator.federation.capture import CaptureDirectory
from coordinator.federation.job import JobOutcome
from coordinator.federation.job_start import JobBook
from coordinator.federation.report_check import check_contribution
from coordinator.federation.superlink import kill_pids
from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from protocol.envelope import peek_envelope
from protocol.tasks.contribution import ContributionRecord
from protocol.tasks.windows import save_window_file

pytest_plugins = ["mqtt_fixtures"]


def _midgate(*args: str) -> str:
    return subprocess.run(
        [PYTHON, "-c", "from midgate_cli import app; app()", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


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

    below: list[int] = []
    validation = tmp_path / "validation.npz"
    save_window_file(validation, plaid_windows("test"))
    # The MID operator's command: it invites every enrolled device with a Flower node ("all online": no --device),
    # runs the job on serve's SuperLink once their SuperNodes joined, re-invites while it runs, and exits 0 only when
    # the run finished:completed with every round in the ServerApp's outcome.
    job = ServiceProcess(
        "job",
        [
            "coordinator", "job", "start", "job-1", "--config", str(stack.config), "--task", "plaid-appliance@1",
            "--rounds", "2", "--validation", str(validation), "--purpose", "research", "--buyer", "acme",
        ],
        tmp_path / "job.log",
    )  # fmt: skip
    try:
        job.start()
        assert job.proc is not None
        assert job.proc.wait(timeout=240) == 0, job.log_path.read_text(errors="replace")
        book = JobBook(stack.data_dir / "federation" / "job-book").read("job-1")
        assert book is not None and (book.status, book.flower_status) == ("completed", "finished:completed")
        assert sorted(book.selected_node_ids) == sorted(r.flower_node_id for _, r in agents)
        nonces = {d.node_id: book.nonces[d.device_id] for d in book.invited}
        # The job's output goes to the coordinator's `[federation] jobs_dir` (default), where ingest finds captures.
        run_dir = stack.data_dir / "federation" / "jobs" / f"run-{book.run_id}"
        outcome = JobOutcome.read(run_dir)
        assert outcome.status == "finished" and outcome.rounds_completed == 2 and outcome.drops == []
        assert book.outcome == outcome
        listed = _midgate("coordinator", "job", "list", "--config", str(stack.config))
        assert listed.splitlines()[0].startswith("job-1\tcompleted\tplaid-appliance@1\t2/2\t")

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
        if job.log_path.exists():
            print(f"---- job start ----\n{job.log_path.read_text(errors='replace')[-6000:]}")
        for log in sorted(tmp_path.glob("agent-*/data/mids/*/jobs/*/supernode.log")):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-3000:]}")
        for log in sorted((stack.data_dir / "federation").glob("**/*.log")):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        job.stop()
        for handle, _ in agents:
            if handle.process is not None and handle.process.proc is not None:
                below += _flower_pids(handle.process.proc.pid)
                handle.process.stop()
        kill_pids(below, 5.0)
