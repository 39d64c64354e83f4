"""The federated end-to-end stack, one setup for every test that trains through midgate's roles: Mosquitto +
`coordinator serve` with `[federation] enabled` (its SuperLink on a free port) + enrolled `agent run`s each replaying
its share of PLAID's recordings (split by label) into its own sample store from its agent.toml and cutting the job's
windows from it when invited, a job run by the MID operator's `midgate coordinator job start`, and the reports the
ledger logged. Builds on mqtt_fixtures' MessagingStack (processes stopped by PID there) and flower_fixtures' split;
`stopping_federation` stops what the agents' SuperNodes left behind (they run in their own process groups).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from agent_sensing import plaid_sensor_toml, wait_loaded
from flower_fixtures import plaid_windows, split_indices_by_label
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, ServiceProcess, agent_toml, free_port, wait_until

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate
from coordinator.federation.job_start import JobBook, JobRecord
from coordinator.federation.superlink_process import kill_pids
from coordinator.gate.update_check import check_contribution
from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from edge.agent.membership import MembershipRecord
from protocol.envelope import peek_envelope
from protocol.messages import ContributionReport
from protocol.tasks.windows import WindowSet, save_window_file

PlaidAgent = tuple[AgentHandle, MembershipRecord]


def midgate(*args: str) -> str:
    """Runs one `midgate ...` command to completion; its stdout (raises when it exits non-zero)."""
    return subprocess.run(
        [PYTHON, "-c", "from midgate_cli import app; app()", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def flags(config: Path) -> list[dict[str, object]]:
    """The devices `coordinator flags --json` lists for the coordinator of `config`, one dict a flag."""
    out = midgate("coordinator", "flags", "--json", "--config", str(config))
    return [json.loads(line) for line in out.splitlines()]


def outbox_refused(handle: AgentHandle) -> list[tuple[int, str]]:
    """(seq, reason) of every report the agent settled as refused by the MID, read without disturbing the agent."""
    db = sqlite3.connect(f"file:{handle.outbox_path}?mode=ro", uri=True, timeout=30)
    try:
        return [(int(seq), str(reason)) for seq, reason in db.execute("SELECT seq, reason FROM refused ORDER BY seq")]
    finally:
        db.close()


def flower_pids(pid: int) -> list[int]:
    """The Flower processes (SuperNode, ClientApp) below an agent: they outlive a stopped agent's process group."""
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if "fl" in p.name()]
    except psutil.Error:
        return []


def start_federated_coordinator(stack: MessagingStack, extra: str = "") -> int:
    """Starts the broker and `coordinator serve` with its SuperLink on a free port; returns that port.

    stack: the test's MessagingStack (stops both by PID at teardown).
    extra: more `[federation]` settings, one `key = value` a line.
    """
    stack.start_broker()
    link_port = free_port()
    stack.coordinator_extra = f"[federation]\nenabled = true\nport = {link_port}\n{extra}"
    stack.start_coordinator()
    return link_port


def enrol_plaid_agent(
    stack: MessagingStack,
    name: str,
    workdir: Path,
    series: list[int],
    spool_poll_s: float = 0.05,
    extra: str = "",
    member: str | None = None,
) -> PlaidAgent:
    """Enrols one device over HTTP whose agent replays PLAID training recordings `series` into its sample store;
    returns its handle (not started) and record.

    spool_poll_s: how often its agent reads the ClientApp's records from its spool (agent_toml's 0.05 s by default).
    extra: more agent.toml settings, one `key = value` a line.
    member: the member the operator's invite names (default `name`: a member with this one device).
    """
    return enrol_agent(stack, name, workdir, plaid_sensor_toml(series), spool_poll_s, extra, member)


def enrol_agent(
    stack: MessagingStack,
    name: str,
    workdir: Path,
    sensors: str,
    spool_poll_s: float = 0.05,
    extra: str = "",
    member: str | None = None,
) -> PlaidAgent:
    """Enrols one device over HTTP whose agent.toml has the `[[sensors]]` tables `sensors`; returns its handle (not
    started) and record. spool_poll_s, extra, member: as for enrol_plaid_agent."""
    handle = AgentHandle(name, workdir)
    # Top-level keys before the [[sensors]] table, or TOML files them under it.
    # The agents of these stacks run jobs: each keeps its warm executor, as a device that has been up for a while does.
    toml = agent_toml(handle.data_dir, f"{extra}\n{sensors}", warm_executor=True)
    handle.config.write_text(toml.replace("spool_poll_s = 0.05", f"spool_poll_s = {spool_poll_s}"))
    invite = stack.invite(member or name)
    record = enrol(AgentSettings.load(handle.config), f"http://127.0.0.1:{stack.http_port}", invite)
    assert record.flower_node_id != 0
    handle.mid, handle.device = record.mid, record.device
    stack.agents.append(handle)
    return handle, record


def start_plaid_agents(
    stack: MessagingStack,
    devices: int,
    spool_poll_s: dict[str, float] | None = None,
    extra: str = "",
    start: Callable[[AgentHandle], object] | None = None,
    members: dict[str, str] | None = None,
) -> list[PlaidAgent]:
    """Splits PLAID's training recordings by label (seed 1) among devices m0, m1, ..., enrols each with a replay of
    its share in its agent.toml and starts its `agent run`; returns once every agent has loaded its recordings and
    the broker saw it publish.

    spool_poll_s: device name -> its agent's spool poll period, where not the default 0.05 s.
    extra: more agent.toml settings for every agent, one `key = value` a line.
    start: starts one enrolled agent (default `stack.start_agent`), e.g. inside a memory cgroup.
    members: device name -> the member it is enrolled for, where not a member of its own (a second device).
    """
    from edge.sensors.plaid import load_plaid_series

    labels = load_plaid_series("train")[0].labels
    agents = []
    for i, series in enumerate(split_indices_by_label(labels, devices, seed=1)):
        name = f"m{i}"
        workdir = stack.root / f"agent-{name}"
        workdir.mkdir()
        poll = (spool_poll_s or {}).get(name, 0.05)
        member = (members or {}).get(name)
        handle, record = enrol_plaid_agent(stack, name, workdir, series.tolist(), poll, extra, member)
        (start or stack.start_agent)(handle)
        agents.append((handle, record))
    broker = stack.broker
    assert broker is not None
    for handle, _ in agents:
        wait_loaded(handle.data_dir / "samples.db")
        wait_until(
            lambda h=handle: f"Received PUBLISH from {h.device}" in broker.log_text(),  # type: ignore[misc]
            60,
            f"agent {handle.name} connected",
        )
    return agents


@dataclass
class Teardown:
    """What a federated test's body started that `stopping_federation` stops: `job start` processes, and the
    Flower processes of agents the body stopped itself (`stop_agent`)."""

    jobs: list[ServiceProcess] = field(default_factory=list)
    below: list[int] = field(default_factory=list)


def start_job(
    stack: MessagingStack,
    teardown: Teardown,
    job_id: str,
    rounds: int,
    *options: str,
    task: str = "plaid-appliance@1",
    validation_set: WindowSet | None = None,
) -> ServiceProcess:
    """Starts the MID operator's `coordinator job start` for every enrolled device with a Flower node ("all online");
    it invites them, runs the job on serve's SuperLink and re-invites while it runs.

    teardown: stops the job when the test ends.
    options: more `job start` options, e.g. "--drift-correction", "1.0".
    task: the task's id@version (default plaid-appliance@1).
    validation_set: the buyer's validation windows (default PLAID's test windows).
    """
    validation = stack.root / "validation.npz"
    save_window_file(validation, plaid_windows("test") if validation_set is None else validation_set)
    job = ServiceProcess(
        "job",
        [
            "coordinator", "job", "start", job_id, "--config", str(stack.config), "--task", task,
            "--rounds", str(rounds), "--validation", str(validation), "--purpose", "research", "--buyer", "acme",
            *options,
        ],
        stack.root / f"job-{job_id}.log",
    )  # fmt: skip
    teardown.jobs.append(job)
    job.start()
    return job


def finished_job(stack: MessagingStack, job: ServiceProcess, job_id: str, timeout_s: float = 240) -> JobRecord:
    """Waits for `job start` to exit 0 (only when the run finished:completed with every round); its job book record."""
    assert job.proc is not None
    assert job.proc.wait(timeout=timeout_s) == 0, job.log_text()
    book = JobBook(stack.data_dir / "federation" / "job-book").read(job_id)
    assert book is not None
    return book


def job_run_dir(stack: MessagingStack, book: JobRecord) -> Path:
    """Where the job's ServerApp wrote its captures and outcome: the coordinator's `[federation] jobs_dir` (default),
    where ingest cross-checks reports with them."""
    return stack.data_dir / "federation" / "jobs" / f"run-{book.run_id}"


def job_nonces(book: JobRecord) -> dict[int, str]:
    """Flower node id -> the nonce of the invitation the job sent that node's device."""
    return {d.node_id: book.nonces[d.device_id] for d in book.invited}


@dataclass(frozen=True)
class LoggedReport:
    """One contribution report in the coordinator's ledger: its signer, its signed payload and the report it is."""

    key_id: str
    payload_type: str
    payload: bytes
    report: ContributionReport


def logged_reports(stack: MessagingStack) -> list[LoggedReport]:
    """Every contribution report in the ledger, in log order."""
    found = []
    for key_id, _, envelope in stack.ledger_contributions():
        payload_type, payload, _ = peek_envelope(envelope)
        found.append(LoggedReport(key_id, payload_type, payload, ContributionReport.model_validate_json(payload)))
    return found


def checked_ledger_reports(
    stack: MessagingStack, captures: CaptureDirectory, nonces: dict[int, str]
) -> list[tuple[LoggedReport, CapturedUpdate]]:
    """Every contribution report in the ledger, each checked: it carries the nonce of its node's invitation (the
    agent took it from the MID's) and names exactly the update the strategy captured from that node in that round
    (check_contribution). Returns each report with that captured update.

    captures: the job's round captures (its run directory).
    nonces: Flower node id -> its invitation's nonce (`job_nonces`).
    """
    checked = []
    for logged in logged_reports(stack):
        report = logged.report
        assert report.round_nonce == nonces[report.node_id], f"{report} carries another nonce than its invitation's"
        checked.append((logged, check_contribution(report, captures.load_round(report.round))))
    return checked


def stop_agent(handle: AgentHandle, below: list[int]) -> None:
    """Stops the agent by PID, first adding the Flower processes below it to `below` (they outlive it)."""
    if handle.process is not None and handle.process.proc is not None:
        below += flower_pids(handle.process.proc.pid)
        handle.process.stop()


def print_federation_logs(stack: MessagingStack) -> None:
    """The job, SuperNode, refused-record and SuperLink logs (the fixture prints the other processes')."""
    for log in sorted(stack.root.glob("job-*.log")):
        print(f"---- {log} ----\n{log.read_text(errors='replace')[-6000:]}")
    for log in sorted(stack.root.glob("agent-*/data/mids/*/jobs/*/supernode.log")):
        print(f"---- {log} ----\n{log.read_text(errors='replace')[-3000:]}")
    for rejected in sorted(stack.root.glob("agent-*/data/spool/*/rejected/*.error")):
        print(f"---- {rejected} ----\n{rejected.read_text(errors='replace')}")
    for log in sorted((stack.data_dir / "federation").glob("**/*.log")):
        print(f"---- {log} ----\n{log.read_text(errors='replace')[-6000:]}")


@contextlib.contextmanager
def stopping_federation(stack: MessagingStack, agents: list[PlaidAgent]) -> Iterator[Teardown]:
    """Around a federated test's body: prints the federation's logs when it raises, and always stops the body's jobs
    and the agents by PID, then the Flower processes below them."""
    teardown = Teardown()
    try:
        yield teardown
    except BaseException:
        print_federation_logs(stack)
        raise
    finally:
        for job in teardown.jobs:
            job.stop()
        for handle, _ in agents:
            stop_agent(handle, teardown.below)
        kill_pids(teardown.below, 5.0)
