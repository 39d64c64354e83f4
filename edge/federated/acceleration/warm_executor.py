"""A warm executor for the device's Flower processes: forks them from a parent that already imported torch.

With Flower's defaults every train message starts a fresh `flwr-clientapp` process that spends about 4 s importing
torch before it trains for a fraction of a second. The agent instead starts one `WarmExecutor` per job: a process
that imports torch, Flower and the midgate ClientApp once and then forks a child per request. Flower is used as
shipped: its SuperExec launches `flwr-clientapp` by name from PATH, and the SuperExec's PATH starts with a directory
of launcher scripts (`install_launchers`) that ask the warm parent to fork the real Flower entry point
(`flwr.supernode.cli.flwr_clientapp.flwr_clientapp`) with the launcher's argv, environment, working directory and
standard streams, then wait for it and exit with its status, forwarding signals. SuperNode and SuperExec are forked
the same way, so every Flower process of the device shares the one copy of torch, numpy and Flower in memory.

A forked ClientApp first waits until the SuperNode's log shows its message pulled (message_wait.py). Fork safety:
the parent never runs torch code or starts threads, so children start from a quiescent interpreter. If the warm
parent is unreachable, a launcher execs the ordinary Flower command instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from edge.federated.acceleration.message_wait import wait_for_message
from edge.federated.supernode import kill_pids

ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "flwr-clientapp": ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    "flower-superexec": ("flwr.supercore.cli.flower_superexec", "flower_superexec"),
    "flower-supernode": ("flwr.supernode.cli.flower_supernode", "flower_supernode"),
}
# torch._dynamo: the first optimiser a process builds imports it (about 800 modules, 1.3 s measured here).
PRELOAD = ("torch", "torch._dynamo", "edge.federated.client_app", *(module for module, _ in ENTRY_POINTS.values()))
MAX_REQUEST_BYTES = 1 << 20
MAX_SOCKET_PATH_BYTES = 100  # sun_path holds 108 bytes on Linux (104 on BSDs), terminating NUL included

_LAUNCHER = """#!{python} -I
# midgate warm-executor launcher for `{name}` (edge/federated/acceleration/warm_executor.py); generated, do not edit.
import json, os, signal, socket, struct, sys
SOCKET, FALLBACK, NAME = {socket!r}, {fallback!r}, {name!r}
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(SOCKET)
except OSError:
    os.execv(FALLBACK, [FALLBACK, *sys.argv[1:]])
def recv_exact(n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            sys.exit(70)
        data += chunk
    return data
body = json.dumps({{"argv": [NAME, *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(conn, [struct.pack(">I", len(body)) + body], [0, 1, 2])
pid = struct.unpack(">I", recv_exact(4))[0]
def forward(signum, frame):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, forward)
code = struct.unpack(">i", recv_exact(4))[0]
sys.exit(code if code >= 0 else 128 - code)
"""


def install_launchers(bin_dir: Path, socket_path: Path) -> Path:
    """Write one launcher per Flower entry point into `bin_dir`; put `bin_dir` first on PATH to use them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ENTRY_POINTS:
        fallback = Path(sys.executable).with_name(name)
        path = bin_dir / name
        text = _LAUNCHER.format(python=sys.executable, name=name, socket=str(socket_path), fallback=str(fallback))
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def _recv_request(conn: socket.socket) -> tuple[dict[str, object], list[int]]:
    conn.settimeout(5)
    head, fds, _, _ = socket.recv_fds(conn, 4 + MAX_REQUEST_BYTES, 3)
    if len(head) < 4:
        raise ValueError("short request")
    size = struct.unpack(">I", head[:4])[0]
    if size > MAX_REQUEST_BYTES:
        raise ValueError("request too large")
    body = head[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("truncated request")
        body += chunk
    request = json.loads(body)
    if not isinstance(request, dict) or len(fds) != 3:
        raise ValueError("malformed request")
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or argv[0] not in ENTRY_POINTS:
        raise ValueError("unknown entry point")
    return request, fds


def _run_child(request: dict[str, object], fds: list[int], entry: Callable[[], None]) -> None:
    """In the forked child: become the requested Flower process. Never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.chdir(str(request["cwd"]))
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        sys.argv = [str(a) for a in request["argv"]]  # type: ignore[attr-defined]
        if sys.argv[0] == "flwr-clientapp":
            waited = wait_for_message(1)
            print(f"midgate warm executor: ClientApp started after {waited:.3f} s waiting for its message", flush=True)
        entry()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(socket_path: Path, agent_pid: int | None = None) -> None:
    """The warm parent: preload, then fork one child per launcher request until SIGTERM or the agent exits.

    `agent_pid`: the agent that started it (default: our parent now). Named by the agent rather than read here, so
    that an agent that dies before this process gets here, or during the imports (seconds on a small board), never
    leaves a parent holding torch's pages for ever: once orphaned, getppid() names whoever adopted us instead."""
    import importlib

    parent = os.getppid() if agent_pid is None else agent_pid
    entries: dict[str, Callable[[], None]] = {}
    for module_name in PRELOAD:
        importlib.import_module(module_name)
    for name, (module_name, attr) in ENTRY_POINTS.items():
        entries[name] = getattr(importlib.import_module(module_name), attr)

    # Python's cyclic GC writes to every tracked object it visits; freezing the preloaded objects keeps the
    # children's collections from copying the parent's pages, so they stay shared.
    gc.freeze()
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(64)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    waiting: dict[int, socket.socket] = {}
    print(f"warm executor ready on {socket_path} (pid {os.getpid()})", flush=True)
    while not stopping and os.getppid() == parent:
        for _key, _ in selector.select(timeout=0.05):
            conn, _addr = listener.accept()
            try:
                request, fds = _recv_request(conn)
            except (OSError, ValueError) as err:
                print(f"warm executor: refused a request: {err}", flush=True)
                conn.close()
                continue
            argv0 = str(request["argv"][0])  # type: ignore[index]
            pid = os.fork()
            if pid == 0:
                selector.close()
                listener.close()
                conn.close()
                _run_child(request, fds, entries[argv0])
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack(">I", pid))
            waiting[pid] = conn
        _reap(waiting)
    _stop_children(waiting)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()


def _reap(waiting: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                conn.sendall(struct.pack(">i", code))
            conn.close()


def _stop_children(waiting: dict[int, socket.socket], grace: float = 5.0) -> None:
    kill_pids([child.pid for child in psutil.Process().children(recursive=True)], grace)
    _reap(waiting)


@dataclass
class WarmExecutor:
    """The agent's handle on one warm parent: `start()` waits until it listens; `stop()` ends it and its children.

    The agent keeps one warm parent per membership from its start to its stop when `keep_warm_executor` is on
    (edge.agent.job_node): a job's SuperNode then starts at once instead of after the parent's imports, and
    `stop_children()` ends what a job forked while the parent stays. `ensure_started()` is what both the agent's
    warm-up and a job's SuperNode call: one start at a time, none while the parent lives."""

    directory: Path
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    _socket: Path | None = None
    _socket_dir: Path | None = None  # a private temporary folder, when `directory` is too deep for a socket path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def socket_path(self) -> Path:
        """`directory/warm.sock`, or the same name in a fresh 0700 temporary folder when that path does not fit a Unix
        socket address (an agent's job folder, `mids/{mid}/jobs/{job id}/warm`, easily passes 108 bytes)."""
        if self._socket is None:
            default = self.directory / "warm.sock"
            if len(os.fsencode(default)) <= MAX_SOCKET_PATH_BYTES:
                self._socket = default
            else:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="midgate-warm-"))
                self._socket = self._socket_dir / "warm.sock"
        return self._socket

    @property
    def bin_dir(self) -> Path:
        return self.directory / "bin"

    def start(self, timeout: float = 120.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        install_launchers(self.bin_dir, self.socket_path)
        log = (self.log_path or self.directory / "warm.log").open("ab")
        env = dict(os.environ)
        env.update(self.env)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-P",  # never the working directory on sys.path: a data folder named like a package would shadow it
                "-m",
                "edge.federated.acceleration.warm_executor",
                "serve",
                "--socket",
                str(self.socket_path),
                "--agent-pid",
                str(os.getpid()),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"warm executor exited with {self.proc.returncode}")
            with socket.socket(socket.AF_UNIX) as probe:
                if self.socket_path.exists() and probe.connect_ex(str(self.socket_path)) == 0:
                    return  # the probe's empty request is refused by the parent and costs nothing
            time.sleep(0.05)
        kill_pids([self.proc.pid], 5.0)  # never a parent that might listen later beside the next start's
        self.proc.wait(timeout=5.0)
        raise TimeoutError("warm executor did not start listening")

    def ensure_started(self, timeout: float = 120.0) -> None:
        """Start the warm parent unless it lives; a caller arriving during another's start waits for that start.
        Blocking: run it in a worker thread."""
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self.start(timeout)

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *self.child_pids()]

    def child_pids(self) -> list[int]:
        """Every live process the parent forked (and their descendants): a job's SuperNode, SuperExec, ClientApps."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        with contextlib.suppress(psutil.Error):
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        return []

    def stop_children(self, grace: float = 10.0) -> None:
        """End every process the parent forked (SIGTERM, SIGKILL after `grace`); the parent stays warm."""
        kill_pids(self.child_pids(), grace)

    def stop(self, grace: float = 10.0) -> None:
        with self._lock:
            self._stop(grace)

    def _stop(self, grace: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        if self.proc.poll() is None:
            for pid in self.pids():
                with contextlib.suppress(psutil.Error):
                    psutil.Process(pid).kill()
            self.proc.wait(timeout=grace)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket = self._socket_dir = None  # a later start makes a fresh one


def main() -> None:
    parser = argparse.ArgumentParser(description="midgate warm executor for Flower processes")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--agent-pid", type=int, default=None, help="exit once this process is no longer our parent")
    args = parser.parse_args()
    serve(args.socket, args.agent_pid)


if __name__ == "__main__":
    main()
