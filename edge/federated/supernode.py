"""The device's Flower SuperNode: its EC node key, and the process the agent starts for a job and stops after.

The SuperNode authenticates to the MID's SuperLink with the device's own EC key (OpenSSH format, NIST P-256),
trusts only the MID's CA, and passes the device's window file and spool directory to the ClientApp through its
node config. It runs in its own process group so stopping it also stops Flower's SuperExec and app processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from runtime.processes import end_process_group, kill_pids

if TYPE_CHECKING:  # edge.federated.acceleration builds on this module
    from edge.federated.acceleration.warm_executor import WarmExecutor

# Flower's own exit code (flwr.supercore.exit.ExitCode.SUPERNODE_CONNECTION_ERROR), logged as "Exit Code: 305"
# when the SuperLink refuses to activate the node (e.g. its key is not registered); the process itself exits 1,
# as every failing Flower process does, so supervision reads the code from the log.
EXIT_NODE_NOT_REGISTERED = 305

_EXIT_CODE_LINE = re.compile(rb"Exit Code: (\d+)")


@dataclass(frozen=True)
class NodeKey:
    private_key: Path
    public_key: Path


def generate_node_key(directory: Path, name: str = "supernode") -> NodeKey:
    """A fresh P-256 key pair in OpenSSH format; the private key is written 0600 and never logged."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    paths = NodeKey(directory / name, directory / f"{name}.pub")
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(paths.private_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, private)
    finally:
        os.close(fd)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    paths.public_key.write_bytes(public + b"\n")
    return paths


def _flower_executable(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _quote(value: str) -> str:
    if "'" in value or "\n" in value:
        raise ValueError("node config values must not contain quotes or newlines")
    return f"'{value}'"


@dataclass
class SuperNodeProcess:
    """One device's SuperNode for one job.

    Parameters
    ----------
    flwr_home: the SuperNode's own FLWR_HOME.
    superlink: the SuperLink's address (host:port).
    ca_cert: the MID's CA certificate.
    key: the device's node key (registered with the SuperLink at enrolment).
    data_path, spool_dir: handed to the ClientApp as node config `data-path` and `spool-dir`.
    clientappio_port: the SuperNode's local port for its ClientApps (Flower's default 9094 would collide).
    extra_env: more environment for Flower's processes.
    warm: when given, the SuperNode runs as `midgate-supernode` (`--isolation process` with its SuperExec in a thread,
        edge/federated/supernode_main.py), forked like its ClientApps from this warm executor (Flower acceleration:
        edge.federated.acceleration.device.accelerated sets it), which `start` starts (unless it lives) and `stop`
        stops; otherwise Flower's default: the SuperNode starts its own SuperExec process, which starts a fresh
        ClientApp per message.
    warm_kept: the warm executor outlives this SuperNode (the agent keeps it between jobs): `stop` and `kill` end
        only what it forked, and `pids` lists only that.
    one_process: without `warm`, the SuperNode runs as `midgate-supernode --clientapp-threads`: one process that
        imports torch and the ClientApp, with its SuperExec and ClientApps in threads (the least memory a job takes,
        edge/federated/supernode_main.py).
    """

    flwr_home: Path
    superlink: str
    ca_cert: Path
    key: NodeKey
    data_path: Path
    spool_dir: Path
    clientappio_port: int
    extra_env: dict[str, str] | None = None
    log_path: Path | None = None
    warm: WarmExecutor | None = None
    warm_kept: bool = False
    one_process: bool = False
    proc: subprocess.Popen[bytes] | None = None

    def _command(self, name: str) -> str:
        return str(self.warm.bin_dir / name) if self.warm is not None else _flower_executable(name)

    def argv(self) -> list[str]:
        node_config = f"data-path={_quote(str(self.data_path))} spool-dir={_quote(str(self.spool_dir))}"
        if self.warm is not None:
            program, isolation = [self._command("midgate-supernode")], "process"
        elif self.one_process:
            program, isolation = [self._command("midgate-supernode"), "--clientapp-threads"], "process"
        else:
            program, isolation = [self._command("flower-supernode")], "subprocess"
        return [
            *program,
            "--superlink",
            self.superlink,
            "--root-certificates",
            str(self.ca_cert),
            "--auth-supernode-private-key",
            str(self.key.private_key),
            "--node-config",
            node_config,
            "--isolation",
            isolation,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.clientappio_port),
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(self.flwr_home), "PYTHONUNBUFFERED": "1"})
        # Flower starts its SuperExec and ClientApp processes by bare name, so the scripts directory goes on PATH,
        # after the warm executor's launchers when there is one.
        path = [str(Path(sys.executable).parent), env.get("PATH", "")]
        if self.warm is not None:
            path.insert(0, str(self.warm.bin_dir))
        env["PATH"] = os.pathsep.join(path)
        env.update(self.extra_env or {})
        return env

    def start(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if self.warm is not None:
            self.warm.ensure_started()
        log = (self.log_path or self.flwr_home / "supernode.log").open("ab")
        env = self.env()
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def pids(self) -> list[int]:
        """Every live process of this SuperNode: launchers, SuperNode, SuperExec, ClientApps, and the warm executor
        unless it is kept."""
        found: list[int] = []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                found += [self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))]
        if self.warm is not None:
            found += self.warm.child_pids() if self.warm_kept else self.warm.pids()
        return found

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the SuperNode, SIGKILL what is left after `grace`, end detached descendants (Flower starts its
        SuperExec in a new session) by PID, stop the warm executor (a kept one: what it forked);
        returns the SuperNode's exit code."""
        if self.proc is None:
            return None
        below = self.pids()
        end_process_group(self.proc, grace)
        if self.warm is not None and self.warm_kept:
            self.warm.stop_children(grace)
        elif self.warm is not None:
            self.warm.stop(grace)
        kill_pids(below, grace)
        return self.proc.returncode

    def kill(self) -> list[int]:
        """SIGKILL every process of this SuperNode at once, as a power cut would (a kept warm executor is not the
        SuperNode's: it stays); returns the PIDs killed."""
        if self.proc is None:
            return []
        victims = self.pids()
        for pid in victims:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        warm = self.warm.proc if self.warm is not None and not self.warm_kept else None
        for proc in (self.proc, warm):
            if proc is not None:
                proc.wait(timeout=10)
        psutil.wait_procs([p for p in (_process(pid) for pid in victims) if p is not None], timeout=10)
        return victims

    def flower_exit_code(self) -> int | None:
        """The last "Exit Code: N" Flower logged for this SuperNode, if any."""
        if self.log_path is None or not self.log_path.exists():
            return None
        codes = _EXIT_CODE_LINE.findall(self.log_path.read_bytes())
        return int(codes[-1]) if codes else None

    def has_joined(self) -> bool:
        """Whether this node's log shows it was ever activated by the SuperLink (it logs its node id then)."""
        return self.log_path is not None and self.log_path.exists() and b"SuperNode ID:" in self.log_path.read_bytes()

    def wait_exit(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.1)
        return None
