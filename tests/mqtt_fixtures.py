"""A real Mosquitto per test: free loopback port, config and log in tmp_path, stopped by PID, log shown on failure.

Use from a test module with `pytest_plugins = ["mqtt_fixtures"]` (pytest puts tests/ on sys.path), then ask for
`mosquitto` (anonymous, no ACL) or `messaging_stack` (broker + coordinator + agents as real processes), or build a
`MosquittoProcess(...)` for the auth/ACL configs written by `coordinator.broker`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
import psutil
import pytest

if TYPE_CHECKING:
    from protocol.identity import SignerKey
    from protocol.messages import ContributionBody, ContributionReport

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
_READY_TIMEOUT_S = 20.0


# The ports tests hand to the processes they start come from below the kernel's ephemeral range, one slice of
# _PORT_SLICE ports per xdist worker, walked from a random start. A port the OS hands out by bind(0) is in the
# ephemeral range, where in the seconds before the process binds it the OS may give it to another worker's service
# asking for port 0 or as the local port of any outgoing loopback connection (seen on CI: a coordinator's HTTP port,
# chosen free, was in use when the coordinator bound it). Below that range only this picker hands ports out.
_PORT_FLOOR = 10_000
_PORT_SLICE = 1_000


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _port_slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slices = max(1, (_ephemeral_floor() - _PORT_FLOOR) // _PORT_SLICE)
    start = _PORT_FLOOR + (int(worker) if worker.isdigit() else 0) % slices * _PORT_SLICE
    return range(start, start + _PORT_SLICE)


_PORTS = _port_slice()
_next_port = _PORTS.start + random.randrange(len(_PORTS))


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, from this worker's slice below the ephemeral range; not handed out again
    until the walk has gone round the slice."""
    global _next_port
    for _ in range(len(_PORTS)):
        port = _next_port
        _next_port = _PORTS.start + (_next_port + 1 - _PORTS.start) % len(_PORTS)
        if _bindable(port):
            return port
    raise OSError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1}")


def wait_for_port(port: int, timeout_s: float = _READY_TIMEOUT_S, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s}s")


def basic_config(workdir: Path, port: int) -> str:
    """An anonymous loopback listener with persistence; enough for tests that do not exercise broker auth."""
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    return "\n".join(
        [
            "per_listener_settings false",
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data}/",
            "autosave_interval 1",
            "max_queued_messages 1000000",
            "max_inflight_messages 0",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "",
        ]
    )


class MosquittoProcess:
    """One mosquitto process with a given config file; restartable on the same port after a stop or SIGKILL."""

    def __init__(self, workdir: Path, config_text: str, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.config_path = workdir / "mosquitto.conf"
        # With `log_dest file` (what broker-config writes) Mosquitto logs only there, not to its standard output.
        log_dest = re.search(r"^log_dest file (.+)$", config_text, re.MULTILINE)
        self.log_path = Path(log_dest.group(1)) if log_dest else workdir / "mosquitto.log"
        self.stdout_path = workdir / "mosquitto.stdout" if log_dest else self.log_path
        self.pid_path = workdir / "mosquitto.pid"
        workdir.mkdir(parents=True, exist_ok=True)
        if "pid_file" not in config_text:
            config_text += f"pid_file {self.pid_path}\n"
        if os.geteuid() == 0 and "\nuser " not in config_text:
            # As root, mosquitto drops to user `mosquitto`, which cannot write into pytest's private tmp folders.
            config_text += "user root\n"
        self.config_path.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.stdout_path.open("ab")
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config_path), "-v"], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def reload(self) -> None:
        """SIGHUP: mosquitto rereads its password and ACL files."""
        os.kill(self.pid, signal.SIGHUP)

    def kill(self) -> None:
        """SIGKILL, as a crash: in-memory QoS 1 state not yet autosaved is lost."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        paths = dict.fromkeys([self.stdout_path, self.log_path])  # what it said before it opened its log, then the log
        return "".join(path.read_text(errors="replace") for path in paths if path.exists())


@contextlib.contextmanager
def running_mosquitto(
    workdir: Path, config_text: str | None = None, port: int | None = None
) -> Iterator[MosquittoProcess]:
    """Start mosquitto, yield it, always stop it by PID; print its log when the body raised."""
    port = port or free_port()
    broker = MosquittoProcess(workdir, config_text or basic_config(workdir, port), port)
    failed = False
    try:
        broker.start()
        yield broker
    except BaseException:
        failed = True
        raise
    finally:
        broker.stop()
        if failed:
            print(f"---- mosquitto log {broker.log_path} ----\n{broker.log_text()[-20000:]}")


@pytest.fixture
def mosquitto(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MosquittoProcess]:
    """An anonymous, persistent mosquitto on a free loopback port for one test."""
    with running_mosquitto(tmp_path / "mosquitto") as broker:
        yield broker
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"---- mosquitto log {broker.log_path} ----\n{broker.log_text()[-20000:]}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + report.when, report)


# --- the messaging stack as real processes: coordinator and agents -----------------------------------------------

REPO = Path(__file__).resolve().parents[1]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else "python3"


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.05) -> None:
    """Poll `predicate` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


def wait_exited(process: psutil.Process, timeout_s: float, what: str) -> None:
    """Wait until `process` has exited: gone, or a zombie (an orphan's exit is reaped by whoever adopted it, maybe
    never in a container); fail naming `what` after `timeout_s`."""

    def exited() -> bool:
        try:
            return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(exited, timeout_s, what)


class ServiceProcess:
    """A `midgate ...` subprocess with its log in a file; stopped (or SIGKILLed) by PID."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-c", "from midgate_cli import app; app()", *self.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=self.env,
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def coordinator_toml(
    data_dir: Path,
    mid: str,
    broker_port: int,
    http_port: int,
    extra: str = "",
    broker_extra: str = "",
    plain_devices: bool = True,
) -> str:
    """plain_devices: enrolment grants name the coordinator's own plain listener (loopback tests); False: the broker's
    TLS listener from `[broker_config]` and the MID CA, as in production."""
    devices = f"public_port = {broker_port}\npublic_tls = false" if plain_devices else ""
    return f"""
mid = "{mid}"
data_dir = "{data_dir}"
log_json = true
[broker]
host = "127.0.0.1"
port = {broker_port}
{devices}
{broker_extra}
[broker_config]
output_dir = "{data_dir / "broker"}"
[enrolment]
host = "127.0.0.1"
port = {http_port}
[ingest]
batch_window_ms = 5
rate_per_s = 100000.0
rate_burst = 100000
{extra}
"""


def tls_broker_config_toml(broker_dir: Path, tls_port: int, local_port: int) -> str:
    """The `[broker_config]` table for a broker as `broker-config` writes it (TLS for devices on `tls_port`, the plain
    loopback listener on `local_port`), run as root: its `mosquitto` user cannot enter pytest's private folders
    (test_broker_debian.py runs it the packaged way). Replaces the table `coordinator_toml` writes."""
    return f"""
[broker_config]
output_dir = "{broker_dir}"
listen_host = "127.0.0.1"
tls_port = {tls_port}
local_port = {local_port}
user = "root"
"""


class DeviceClient:
    """A bare MQTT 5 client with a device's credentials, recording PUBACK/SUBACK reason codes."""

    def __init__(self, port: int, username: str, password: str, ca_file: Path | None) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"probe-{username}", protocol=paho.MQTTv5)
        self.client.username_pw_set(username, password)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.connack: list[int] = []
        self.pubacks: dict[int, int] = {}
        self.subacks: list[int] = []
        self.received: list[str] = []
        self.lock = threading.Lock()
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.append(rc.value)
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.received.append(m.topic)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.extend(r.value for r in rcs)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(lambda: bool(self.connack), 10, "CONNACK")

    def _on_publish(self, c: object, u: object, mid: int, rc: paho.ReasonCode, p: object) -> None:
        with self.lock:
            self.pubacks[mid] = rc.value

    def publish(self, topic: str, payload: bytes) -> int:
        info = self.client.publish(topic, payload, qos=1)
        wait_until(lambda: info.mid in self.pubacks, 10, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.slow
def agent_toml(data_dir: Path, extra: str = "", heartbeat_s: float | None = 5.0, warm_executor: bool = False) -> str:
    """An agent.toml for the tests: quick heartbeats, spool polls, resends and reconnects; `heartbeat_s` None keeps
    the agent's default heartbeat period. `warm_executor` False (unless `extra` sets keep_warm_executor): the agent
    does not import torch and Flower into a kept executor when it starts, which costs about 6 s of CPU per agent and
    is wasted in the tests that run no job (most of them); a job then starts its executor when invited."""
    beat = "" if heartbeat_s is None else f"heartbeat_s = {heartbeat_s}"
    warm = "" if "keep_warm_executor" in extra else f"keep_warm_executor = {str(warm_executor).lower()}"
    # Several agents share this host: each serves its member page on a free port (member-page.url says which).
    page = "" if "member_page_port" in extra else "member_page_port = 0"
    return f"""
data_dir = "{data_dir}"
{beat}
{page}
{warm}
spool_poll_s = 0.05
resend_after_s = 2.0
resend_max_s = 4.0
reconnect_min_s = 1.0
reconnect_max_s = 2.0
{extra}
"""


def http_ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


RUN_ID = 7
"""The Flower run the contribution bodies of messaging tests belong to (MessagingStack.invite_to_run)."""


def round_nonce(device: str) -> str:
    """The invitation nonce tests give `device` for its reports of RUN_ID."""
    import hashlib

    return hashlib.sha256(f"nonce/{device}".encode()).hexdigest()[:32]


def contribution_body(i: int, device: str = "", **changes: object) -> ContributionBody:
    """A valid spool body, the i-th of `device`: a (round, node) of its own, so each has its own spool name, and an
    `update_sha256` unique per (device, i), so the ledger can be checked exactly. `changes` replace fields."""
    import hashlib

    from protocol.messages import ContributionBody

    def h(label: str) -> str:
        return hashlib.sha256(f"{label}/{device}/{i}".encode()).hexdigest()

    fields: dict[str, object] = {
        "run_id": RUN_ID,
        "round": i % 1000 + 1,
        "node_id": 42 + i // 1000,
        "task_id": "appliance-load",
        "task_version": 1,
        "global_model_sha256": h("global"),
        "update_sha256": h("update"),
        "examples": 128,
        "dataset_fingerprint": h("data"),
        "loss_before": 0.9,
        "loss_after": 0.5,
        "seconds": 1.5,
    }
    return ContributionBody.model_validate({**fields, **changes})


def contribution_report(
    i: int, device: str, seq: int, now_ms: int, nonce: str | None = None, **changes: object
) -> ContributionReport:
    """The report an agent signs for `contribution_body(i, device, **changes)`: with `seq`, `now_ms` and its
    invitation nonce (`round_nonce(device)` unless `nonce` is given)."""
    from protocol.messages import ContributionReport

    return ContributionReport.from_body(
        contribution_body(i, device, **changes),
        seq=seq,
        device_time_ms=now_ms,
        round_nonce=round_nonce(device) if nonce is None else nonce,
    )


def signed_invitation(
    mid_key: SignerKey,
    job_id: str,
    run_id: int,
    *,
    nonce: str | None = None,
    deadline_s: float = 60.0,
    buyer: str = "acme",
    purpose: str = "research",
    task_id: str = "plaid-appliance",
) -> bytes:
    """A RoundInvitation to round 1 of `run_id` for `task_id`@1, signed by `mid_key` as `job start` signs it (a fresh
    nonce unless `nonce` is given), valid for `deadline_s` from now."""
    import secrets

    from protocol.messages import RoundInvitation

    now = time.time_ns() // 1_000_000
    return RoundInvitation(
        job_id=job_id,
        run_id=run_id,
        round=1,
        task_id=task_id,
        task_version=1,
        purpose=purpose,
        buyer=buyer,
        nonce=secrets.token_hex(16) if nonce is None else nonce,
        issued_ms=now,
        deadline_ms=now + int(deadline_s * 1000),
    ).seal(mid_key)


def write_bodies(agents: list[AgentHandle], total: int, first: int = 0) -> dict[str, set[str]]:
    """Contribution bodies `first`..`first + total - 1` into the agents' spools, dealt round robin; returns device ->
    the update hashes written, to check the ledger against."""
    from edge.federated.spool import write_body

    written: dict[str, set[str]] = {a.device: set() for a in agents}
    for i in range(first, first + total):
        agent = agents[i % len(agents)]
        body = contribution_body(i, agent.device)
        write_body(agent.spool, body)
        written[agent.device].add(body.update_sha256)
    return written


def write_job_record(book_dir: Path, job_id: str, run_id: int, invited: dict[str, tuple[int, str]]) -> None:
    """The record `midgate coordinator job start` keeps of a running job (JobBook), for tests and benchmarks that run
    or fake a Flower run without it: with `[federation] enabled` ingest refuses a captured round's reports unless a job
    record names the run and gives the signing device the report's nonce (`wrong_round_nonce`).

    book_dir: the coordinator's job book (`CoordinatorSettings.job_book_dir`: data_dir/federation/job-book).
    invited: device id -> (its Flower node id, the nonce its reports of this run carry).
    """
    from coordinator.federation.job_start import JobBook, JobDevice, JobRecord, JobRequest

    request = JobRequest(
        job_id=job_id,
        task_id="plaid-appliance",
        task_version=1,
        rounds=1,
        devices=tuple(invited),
        min_nodes=1,
        validation_path=book_dir / "validation.npz",
        purpose="research",
        buyer="acme",
    )
    devices = [JobDevice(device_id=d, member_id=f"member-{d}", node_id=node) for d, (node, _) in invited.items()]
    record = JobRecord(
        request=request,
        invited=devices,
        nonces={d: nonce for d, (_, nonce) in invited.items()},
        selected_node_ids=[d.node_id for d in devices],
        run_id=run_id,
        status="running",
        started_ms=int(time.time() * 1000),
    )
    JobBook(book_dir).write(record)


def holds_nonce(data_dir: Path, mid: str, nonce: str) -> bool:
    """Whether the agent keeps `nonce` among its invitations' nonces (edge.agent.job_node.NONCES_FILE, written before
    it decides whether to join): it signs the spool bodies of that run from then on, whether or not it joins."""
    from edge.agent.job_node import NONCES_FILE

    path = data_dir / "mids" / mid / NONCES_FILE
    try:
        return nonce in path.read_text()
    except FileNotFoundError:
        return False


class AgentHandle:
    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.config = workdir / "agent.toml"
        self.process: ServiceProcess | None = None
        self.mid = ""
        self.device = ""

    @property
    def spool(self) -> Path:
        return self.data_dir / "spool" / self.mid

    @property
    def outbox_path(self) -> Path:
        return self.data_dir / "mids" / self.mid / "outbox.sqlite"

    def outbox_counts(self) -> tuple[int, int]:
        """(pending, receipted) read from the agent's outbox file without disturbing the agent."""
        import sqlite3

        if not self.outbox_path.exists():
            return (0, 0)
        db = sqlite3.connect(f"file:{self.outbox_path}?mode=ro", uri=True, timeout=30)
        try:
            pending = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
            # The enrolment request's receipt is kept there too (seq 0, kind enrol): count the reports.
            receipted = db.execute("SELECT COUNT(*) FROM receipts WHERE kind IS NOT 'enrol'").fetchone()[0]
        finally:
            db.close()
        return int(pending), int(receipted)

    def spool_left(self) -> int:
        return len(list(self.spool.glob("*.json"))) if self.spool.exists() else 0


class MessagingStack:
    """Real Mosquitto + `midgate coordinator serve` + `midgate agent run` processes, all under one tmp folder."""

    def __init__(self, root: Path, mid: str = "riverside", coordinator_extra: str = "") -> None:
        self.root = root
        self.mid = mid
        self.coordinator_extra = coordinator_extra
        self.broker: MosquittoProcess | None = None
        self.coordinator: ServiceProcess | None = None
        self.agents: list[AgentHandle] = []
        self.http_port = free_port()
        self.data_dir = root / "coordinator"
        self.config = root / "coordinator.toml"

    def start_broker(self, config_text: str | None = None, port: int | None = None) -> MosquittoProcess:
        port = port or free_port()
        workdir = self.root / "mosquitto"
        self.broker = MosquittoProcess(workdir, config_text or basic_config(workdir, port), port)
        self.broker.start()
        return self.broker

    def start_coordinator(self) -> ServiceProcess:
        assert self.broker is not None
        if not self.config.exists():
            self.config.write_text(
                coordinator_toml(self.data_dir, self.mid, self.broker.port, self.http_port, self.coordinator_extra)
            )
        if self.coordinator is None:
            self.coordinator = ServiceProcess(
                "coordinator", ["coordinator", "serve", "--config", str(self.config)], self.root / "coordinator.log"
            )
        self.coordinator.start()
        proc = self.coordinator
        wait_until(lambda: http_ready(self.http_port) or not proc.alive, 60, "coordinator HTTP")
        if not proc.alive:
            raise RuntimeError("coordinator exited during startup")
        return proc

    def invite(self, member: str, ttl_s: int = 3600) -> str:
        from coordinator.enrolment.enroller import issue_invite
        from coordinator.mid_key import load_or_create_mid_key
        from coordinator.registry.store import Registry

        key = load_or_create_mid_key(self.data_dir / "mid.key", self.mid)
        registry = Registry(self.data_dir / "registry.sqlite")
        try:
            return issue_invite(registry, key, self.mid, member, time.time_ns() // 1_000_000, ttl_s)
        finally:
            registry.close()

    def enrol_agent(self, name: str, agent_extra: str = "", heartbeat_s: float | None = 5.0) -> AgentHandle:
        from edge.agent.config import AgentSettings
        from edge.agent.enrolment import enrol

        handle = AgentHandle(name, self.root / f"agent-{name}")
        handle.workdir.mkdir(parents=True, exist_ok=True)
        handle.config.write_text(agent_toml(handle.data_dir, agent_extra, heartbeat_s))
        record = enrol(AgentSettings.load(handle.config), f"http://127.0.0.1:{self.http_port}", self.invite(name))
        handle.mid, handle.device = record.mid, record.device
        self.agents.append(handle)
        return handle

    def publish_invitation(self, device: str, run_id: int = RUN_ID, nonce: str | None = None) -> str:
        """Publish the MID's RoundInvitation of `device` to run `run_id` as `job start` does (signed by the MID key,
        with the coordinator's broker login), but retained, so that the device's agent takes it whenever it
        subscribes; returns its nonce (`round_nonce(device)` unless given). The agent signs the spool bodies of the
        run with it and rejects those of a run no invitation named (edge.federated.spool)."""
        import paho.mqtt.client as mqtt

        from coordinator.broker.logins import coordinator_password, coordinator_password_path
        from coordinator.config import CoordinatorSettings
        from coordinator.mid_key import load_or_create_mid_key
        from protocol.topics import DownKind, down_topic

        settings = CoordinatorSettings.load(self.config)
        nonce = round_nonce(device) if nonce is None else nonce
        mid_key = load_or_create_mid_key(settings.mid_key_file, self.mid)
        invitation = signed_invitation(mid_key, f"job-{run_id}", run_id, nonce=nonce, deadline_s=86_400)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-invite-{device}")
        client.username_pw_set(settings.broker.username, coordinator_password(coordinator_password_path(settings)))
        if settings.broker.tls and settings.broker.ca_file is not None:
            client.tls_set(ca_certs=str(settings.broker.ca_file))
        client.connect(settings.broker.host, settings.broker.port)
        client.loop_start()
        try:
            topic = down_topic(self.mid, device, DownKind.INVITE)
            client.publish(topic, invitation, qos=1, retain=True).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()
        return nonce

    def invite_to_run(self, handle: AgentHandle, run_id: int = RUN_ID, nonce: str | None = None) -> str:
        """`publish_invitation` for a running agent, then wait until it took the invitation (it keeps the
        invitation's nonce, whether or not it joins); returns the nonce. Write spool bodies after this."""
        assert handle.process is not None, "start the agent first"
        nonce = self.publish_invitation(handle.device, run_id, nonce)
        wait_until(lambda: holds_nonce(handle.data_dir, self.mid, nonce), 30, f"{handle.name} took the invitation")
        return nonce

    def start_invited_agent(self, handle: AgentHandle) -> ServiceProcess:
        """`start_agent`, then `invite_to_run`: the agent signs the spool bodies of RUN_ID from then on."""
        process = self.start_agent(handle)
        self.invite_to_run(handle)
        return process

    def take_invitation(self, handle: AgentHandle) -> None:
        """`start_invited_agent`, then stop it again: it keeps the invitation's nonce on disk
        (edge.agent.job_node.InvitationNonces), so bodies written into its spool now wait there, all of them, until
        it starts again and signs them."""
        self.start_invited_agent(handle).stop()

    def start_agent(self, handle: AgentHandle) -> ServiceProcess:
        if handle.process is None:
            handle.process = ServiceProcess(
                f"agent-{handle.name}", ["agent", "run", "--config", str(handle.config)], handle.workdir / "agent.log"
            )
        handle.process.start()
        return handle.process

    def ledger_contributions(self) -> list[tuple[str, int, bytes]]:
        """(key id, seq, envelope) of every contribution leaf in the coordinator's ledger, in log order."""
        import json
        import sqlite3

        from protocol.envelope import peek_envelope
        from protocol.leaves import LeafKind, decode_leaf

        path = self.data_dir / "ledger.sqlite"
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute("SELECT data FROM leaves ORDER BY idx").fetchall()
        finally:
            db.close()
        found = []
        for (data,) in rows:
            leaf = decode_leaf(bytes(data))
            if leaf.kind is LeafKind.CONTRIBUTION:
                _, payload, key_ids = peek_envelope(leaf.signed)
                found.append((key_ids[0], int(json.loads(payload)["seq"]), leaf.signed))
        return found

    def ledger_leaves(self, kind: object) -> list[bytes]:
        """The signed bytes of every leaf of `kind` (a protocol.leaves.LeafKind) in the ledger, in log order."""
        import sqlite3

        from protocol.leaves import decode_leaf

        db = sqlite3.connect(f"file:{self.data_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute("SELECT data FROM leaves ORDER BY idx").fetchall()
        finally:
            db.close()
        return [leaf.signed for leaf in (decode_leaf(bytes(data)) for (data,) in rows) if leaf.kind is kind]

    def ledger_size(self) -> int:
        import sqlite3

        db = sqlite3.connect(f"file:{self.data_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            return int(db.execute("SELECT COUNT(*) FROM leaves").fetchone()[0])
        finally:
            db.close()

    def metric(self, name: str, labels: str = "") -> float:
        """A value from the coordinator's /metrics (0.0 when absent)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def processes(self) -> list[tuple[str, Callable[[], str]]]:
        out: list[tuple[str, Callable[[], str]]] = []
        if self.broker is not None:
            out.append(("mosquitto", self.broker.log_text))
        if self.coordinator is not None:
            out.append(("coordinator", self.coordinator.log_text))
        for a in self.agents:
            if a.process is not None:
                out.append((a.process.name, a.process.log_text))
        return out

    def close(self, failed: bool) -> None:
        for a in self.agents:
            if a.process is not None:
                a.process.stop()
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.broker is not None:
            self.broker.stop()
        if failed:
            for name, text in self.processes():
                print(f"---- {name} log (tail) ----\n{text()[-8000:]}")


@pytest.fixture
def messaging_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[MessagingStack]:
    """A MessagingStack under tmp_path; every process it started is stopped by PID, logs printed on failure."""
    stack = MessagingStack(tmp_path)
    try:
        yield stack
    finally:
        report = getattr(request.node, "rep_call", None)
        stack.close(failed=report is None or report.failed)
