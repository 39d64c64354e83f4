"""One Flower SuperLink as a child process, and the process-group handling it shares with the fleet front.

The SuperLink always runs with TLS (the MID's CA), SuperNode authentication, no runtime dependency installation
(the ServerApp imports the installed midgate), telemetry off and its own FLWR_HOME. The `flwr` CLI calls against it
are coordinator.federation.flower_cli; the SuperLink as `serve` configures it is coordinator.federation.mid_superlink.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import psutil

from coordinator.mid_ca import ServerTls
from runtime.processes import end_process_group, kill_pids


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(flwr_home), "PYTHONUNBUFFERED": "1"})
    # Flower starts its SuperExec and app processes by bare name (`flower-superexec`), so the interpreter's
    # scripts directory must be on PATH even when the venv is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


_FREE_PORT_TRIES = 100


def flower_executable(name: str) -> str:
    """The Flower entry point installed beside this interpreter (a venv need not be on PATH)."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def free_loopback_port(avoid: Collection[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that the OS reports free now and that is not in `avoid`: ports the caller's own
    service will bind later (a port configured but not yet listening is free to the OS, which may hand it out)."""
    for _ in range(_FREE_PORT_TRIES):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
    raise OSError(f"no free loopback port outside {sorted(avoid)} in {_FREE_PORT_TRIES} tries")


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


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group led by `proc`, then SIGKILL; then end any detached descendants by PID."""
    below = descendants(proc.pid)
    end_process_group(proc, grace)
    kill_pids(below, grace)


@dataclass
class SuperLinkProcess:
    """One SuperLink: `start()` launches it in its own process group, `stop()` ends that group."""

    flwr_home: Path
    tls: ServerTls
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
