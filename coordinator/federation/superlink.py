"""Supervision of the MID's Flower SuperLink and the `flwr` CLI calls the coordinator makes against it.

The SuperLink always runs with TLS (the MID's CA), SuperNode authentication, no runtime dependency installation
(the ServerApp imports the installed midgate), telemetry off and its own FLWR_HOME. `flwr run` exits 0 even when
the ServerApp fails, so run completion is read from `flwr ls` and from the ServerApp's outcome.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from coordinator.federation.tls import SuperLinkTls

CONNECTION = "midgate"
TERMINAL_PREFIX = "finished"


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"})
    # Flower starts its SuperExec and app processes by bare name (`flower-superexec`), so the interpreter's
    # scripts directory must be on PATH even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def flower_executable(name: str) -> str:
    """The Flower entry point installed beside this interpreter (a venv need not be on PATH)."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that the OS reports free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, deadline: float, alive: subprocess.Popen[bytes] | None = None) -> None:
    """Poll until something accepts TCP connections on host:port; fails early if `alive` exits."""
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"process exited with code {alive.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below `pid` (Flower detaches its SuperExec into a new session, so a process
    group does not cover it)."""
    with contextlib.suppress(psutil.Error):
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return []


def kill_pids(pids: list[int], grace: float) -> None:
    """SIGTERM each PID, then SIGKILL those still alive after `grace` seconds."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group led by `proc`, then SIGKILL; then end any detached descendants by PID."""
    below = descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their leader
    if proc.poll() is None:
        proc.wait(timeout=grace)
    kill_pids(below, grace)


@dataclass
class SuperLinkProcess:
    """One SuperLink: `start()` launches it in its own process group, `stop()` ends that group."""

    flwr_home: Path
    tls: SuperLinkTls
    port: int
    host: str = "127.0.0.1"
    log_path: Path | None = None
    extra_env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        return [
            flower_executable("flower-superlink"),
            "--ssl-certfile",
            str(self.tls.server_cert),
            "--ssl-keyfile",
            str(self.tls.server_key),
            "--ssl-ca-certfile",
            str(self.tls.ca_cert),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation",
            "subprocess",
            "--database",
            str(self.flwr_home / "superlink.db"),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]

    def start(self, timeout: float = 60.0) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        log = (self.log_path or self.flwr_home / "superlink.log").open("ab")
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=flower_env(self.flwr_home, self.extra_env),
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.host, self.port, time.monotonic() + timeout, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)


class FlowerCliError(RuntimeError):
    pass


@dataclass(frozen=True)
class FlowerCli:
    """The `flwr` CLI with its own FLWR_HOME holding one connection, `midgate`, to the SuperLink over TLS."""

    flwr_home: Path
    address: str
    ca_cert: Path

    def write_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.ca_cert}"\n'
        )

    def _run(self, *args: str, timeout: float = 120.0) -> str:
        proc = subprocess.run(
            [flower_executable("flwr"), *args],
            capture_output=True,
            env=flower_env(self.flwr_home),
            timeout=timeout,
            check=False,
        )
        out = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            raise FlowerCliError(
                f"flwr {args[0]} exited {proc.returncode}: {out[-2000:]} {proc.stderr.decode()[-2000:]}"
            )
        return out

    @staticmethod
    def _json(out: str) -> dict[str, object]:
        start = out.find("{")
        if start < 0:
            raise FlowerCliError(f"no JSON in flwr output: {out[-500:]}")
        value = json.loads(out[start:])
        if not isinstance(value, dict) or value.get("success") is False:
            raise FlowerCliError(f"flwr reported failure: {out[-1000:]}")
        return value

    def register_node(self, public_key: Path) -> int:
        """Register a SuperNode's EC public key (OpenSSH format); returns its node id."""
        data = self._json(self._run("supernode", "register", str(public_key), CONNECTION, "--format", "json"))
        return int(str(data["node-id"]))

    def submit_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        data = self._json(self._run("run", str(app_dir), CONNECTION, "--run-config", pairs, "--format", "json"))
        return int(str(data["run-id"]))

    def run_status(self, run_id: int) -> str:
        data = self._json(self._run("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))
        runs = data.get("runs")
        if not isinstance(runs, list) or not runs:
            raise FlowerCliError(f"run {run_id} not listed")
        return str(runs[0]["status"])

    def online_node_ids(self) -> set[int]:
        """Node ids of the SuperNodes connected to the SuperLink now (`flwr supernode list`, status online)."""
        data = self._json(self._run("supernode", "list", CONNECTION, "--format", "json"))
        nodes = data.get("nodes")
        if not isinstance(nodes, list):
            raise FlowerCliError("flwr supernode list: no node list")
        return {int(str(n["node-id"])) for n in nodes if isinstance(n, dict) and n.get("status") == "online"}

    def stop_run(self, run_id: int) -> None:
        self._run("stop", str(run_id), CONNECTION)

    def wait_finished(self, run_id: int, timeout: float, poll: float = 1.0) -> str:
        """Poll the run's status until it is `finished:*`; returns that status (e.g. finished:completed)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_status(run_id)
            if status.startswith(TERMINAL_PREFIX) or time.monotonic() >= deadline:
                return status
            time.sleep(poll)
