"""A fork server: a warm parent that imported a program's modules once forks a child per request to run it.

A program started by name from PATH (Flower's `flwr-clientapp`, `flwr-serverapp`) spends seconds importing torch and
its framework before it does anything. Here a launcher script of the same name sits first on the caller's PATH
(`install_launchers`); it sends its argv, environment, working directory and standard streams to the warm parent
over a Unix socket, the parent forks, the child becomes the program (its entry point called in a process that
already imported it), and the launcher waits for the child and exits with its status, forwarding signals. To its
caller the launcher is the program: same arguments, streams, exit status.

Fork safety: the parent never runs the program's code or starts threads, so every child starts from the same
quiescent interpreter. A child gets the launcher's environment, argv and working directory, so it is as fresh as a
new process except for what was imported. Failure is safe: a launcher that cannot reach the parent, or whose request
the parent does not answer with a child, says why on its stderr and execs the ordinary program instead; a parent
whose owner (`--parent-pid`) is gone exits; a parent told to stop ends its children first.

The table (`ForkTable`) says what a parent preloads, which names it forks and which module attribute each runs, and
an optional hook the child calls with the program's name before it (the device waits for its message there). It is
passed on the parent's command line, so this module knows no program: `python -m runtime.fork_server serve
--socket S --parent-pid P --entry NAME=module:attr ... [--preload module ...] [--prepare module:attr]`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from runtime.processes import kill_pids

MAX_REQUEST_BYTES = 1 << 20
MAX_SOCKET_PATH_BYTES = 100  # sun_path holds 108 bytes on Linux (104 on BSDs), terminating NUL included
READY_LINE = "fork server ready on"
PID_TIMEOUT_S = 15.0  # a launcher whose request got no child after this long starts the program itself

# What a launcher passes on to its child (and the child, once forked, takes with the default action).
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# -I: the caller's PYTHONPATH and working directory cannot change what the launcher runs; -S: it needs only the
# standard library, and skipping site (the venv's .pth hooks) saves about 1 MB in each of the three launchers that
# stand for a device's SuperNode, SuperExec and ClientApp during a job (bench/device_memory_bench.py).
_LAUNCHER = """#!{python} -IS
# midgate fork-server launcher for `{name}` (runtime/fork_server.py); generated, do not edit.
import json, os, signal, socket, struct, sys, time
SOCKET, FALLBACK, NAME, PID_TIMEOUT = {socket!r}, {fallback!r}, {name!r}, {pid_timeout!r}
pid, held = None, []
def forward(signum, frame):
    # Installed before the request: a signal that comes before the child's pid is held, then passed on.
    if pid is None:
        held.append(signum)
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
for signum in ({forwarded}):
    signal.signal(signum, forward)
def fall_back(why):
    if held:
        sys.exit(128 + held[0])  # asked to stop before anything started
    print(f"midgate fork server for {{NAME}}: {{why}}; starting {{FALLBACK}} without it", file=sys.stderr, flush=True)
    os.execv(FALLBACK, [FALLBACK, *sys.argv[1:]])
def recv_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(SOCKET)
    body = json.dumps({{"argv": [NAME, *sys.argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
    socket.send_fds(conn, [struct.pack(">I", len(body)) + body], [0, 1, 2])
    conn.settimeout(PID_TIMEOUT)
    head = recv_exact(conn, 4)
except OSError as err:
    fall_back(f"unreachable at {{SOCKET}} ({{err}})")
if head is None:
    fall_back("the warm parent closed the connection without forking")
conn.settimeout(None)
pid = struct.unpack(">I", head)[0]
for signum in held:
    forward(signum, None)
try:
    tail = recv_exact(conn, 4)
except OSError:
    tail = None
if tail is None:
    # The parent died under its child: wait for the child as long as it runs, as the program's caller would.
    print(f"midgate fork server for {{NAME}}: lost the warm parent; waiting for {{pid}}", file=sys.stderr, flush=True)
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(70)
        time.sleep(0.2)
code = struct.unpack(">i", tail)[0]
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass(frozen=True)
class ForkTable:
    """What one warm parent runs. `entry_points`: the launcher name → "module:attribute" of the callable that is the
    program (it reads sys.argv); `preload`: modules imported before the first fork beyond the entry points' own;
    `prepare`: "module:attribute" of a callable the child calls with the program's name just before the entry point."""

    entry_points: Mapping[str, str]
    preload: Sequence[str] = ()
    prepare: str | None = None

    def argv(self) -> list[str]:
        args = [arg for name, target in self.entry_points.items() for arg in ("--entry", f"{name}={target}")]
        args += [arg for module in self.preload for arg in ("--preload", module)]
        return [*args, "--prepare", self.prepare] if self.prepare else args


def _resolve(target: str) -> Callable[..., object]:
    module, _, attribute = target.partition(":")
    if not module or not attribute:
        raise ValueError(f"expected module:attribute, got {target!r}")
    found = getattr(importlib.import_module(module), attribute)
    if not callable(found):
        raise TypeError(f"{target} is not callable")
    return found  # type: ignore[no-any-return]


def install_launchers(bin_dir: Path, socket_path: Path, names: Sequence[str], fallback_dir: Path | None = None) -> Path:
    """Write one launcher per program name into `bin_dir`, each falling back to the program of that name in
    `fallback_dir` (default: beside this interpreter); put `bin_dir` first on the caller's PATH to use them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        fallback = (fallback_dir or Path(sys.executable).parent) / name
        path = bin_dir / name
        text = _LAUNCHER.format(
            python=sys.executable,
            name=name,
            socket=str(socket_path),
            fallback=str(fallback),
            pid_timeout=PID_TIMEOUT_S,
            forwarded=", ".join(f"signal.{signum.name}" for signum in _FORWARDED),
        )
        path.write_text(text)
        path.chmod(0o755)
    return bin_dir


def _recv_request(conn: socket.socket, names: Mapping[str, object]) -> tuple[dict[str, object], list[int]]:
    conn.settimeout(5)
    head, fds, _, _ = socket.recv_fds(conn, 4 + MAX_REQUEST_BYTES, 3)
    try:
        if len(head) < 4:
            raise ValueError("short request")
        size = struct.unpack(">I", head[:4])[0]
        if size > MAX_REQUEST_BYTES:
            raise ValueError(f"request of {size} bytes, at most {MAX_REQUEST_BYTES}")
        body = head[4:]
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise ValueError("truncated request")
            body += chunk
        request = json.loads(body)
        if not isinstance(request, dict) or len(fds) != 3:
            raise ValueError("malformed request")
        argv, env, cwd = request.get("argv"), request.get("env"), request.get("cwd")
        if not isinstance(argv, list) or not argv or argv[0] not in names:
            raise ValueError(f"unknown program {argv[0] if isinstance(argv, list) and argv else None!r}")
        if not isinstance(env, dict) or not isinstance(cwd, str):
            raise ValueError("malformed request")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return request, fds


def _run_child(
    request: dict[str, object],
    fds: list[int],
    entry: Callable[[], object],
    prepare: Callable[[str], object] | None,
    mask: set[int | signal.Signals],
) -> None:
    """In the forked child: become the requested program. Never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (*_FORWARDED, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.chdir(str(request["cwd"]))
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        argv = request["argv"]
        assert isinstance(argv, list)
        sys.argv = [str(a) for a in argv]
        if prepare is not None:
            prepare(sys.argv[0])
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


def serve(socket_path: Path, table: ForkTable, parent_pid: int | None = None) -> None:
    """The warm parent: preload, then fork one child per launcher request until SIGTERM or its owner exits.

    `parent_pid`: the process that started it (default: our parent now). Named by the owner rather than read here, so
    that an owner that dies before this process gets here, or during the imports (seconds on a small board), never
    leaves a parent holding torch's pages for ever: once orphaned, getppid() names whoever adopted us instead."""
    parent = os.getppid() if parent_pid is None else parent_pid
    for module_name in table.preload:
        importlib.import_module(module_name)
    entries = {name: _resolve(target) for name, target in table.entry_points.items()}
    prepare = _resolve(table.prepare) if table.prepare else None

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
    print(f"{READY_LINE} {socket_path} (pid {os.getpid()}; {', '.join(entries)})", flush=True)
    while not stopping and os.getppid() == parent:
        for _key, _ in selector.select(timeout=0.05):
            conn, _addr = listener.accept()
            try:
                request, fds = _recv_request(conn, entries)
            except (OSError, ValueError) as err:
                print(f"fork server: refused a request: {err}", flush=True)
                conn.close()
                continue
            argv = request["argv"]
            assert isinstance(argv, list)
            # Blocked across the fork: a signal the launcher forwards the moment it learns the pid waits in the child
            # until the child has dropped our handlers for the defaults, instead of running request_stop there.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
            pid = os.fork()
            if pid == 0:
                selector.close()
                listener.close()
                conn.close()
                _run_child(request, fds, entries[str(argv[0])], prepare, mask)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in fds:
                os.close(fd)
            try:
                conn.sendall(struct.pack(">I", pid))
            except OSError as err:
                # The launcher gave up waiting and runs the program itself: never two of it.
                print(f"fork server: launcher gone before it learnt child {pid} ({err}); killing it", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                conn.close()
                continue
            print(f"fork server: forked {argv[0]} as pid {pid}", flush=True)
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
class ForkServer:
    """The owner's handle on one warm parent: `start()` launches it and by default waits until it listens; `stop()`
    ends it and its children; `ensure_started()` starts it unless it lives (one start at a time).

    `module`: what the parent runs as `python -m module serve ...` (runtime.fork_server, or a domain module whose
    `main` calls this module's, so that the process names its role)."""

    directory: Path
    table: ForkTable
    module: str = "runtime.fork_server"
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    fallback_dir: Path | None = None  # where the launchers find the programs themselves (default: beside Python)
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

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-P",  # never the working directory on sys.path: a data folder named like a package would shadow it
            "-m",
            self.module,
            "serve",
            "--socket",
            str(self.socket_path),
            "--parent-pid",
            str(os.getpid()),
            *self.table.argv(),
        ]

    def start(self, timeout: float = 120.0, wait: bool = True) -> None:
        """Install the launchers and launch the parent; with `wait`, return once it listens (its imports done).
        Without, a launcher run before then starts its program the ordinary way."""
        self.directory.mkdir(parents=True, exist_ok=True)
        install_launchers(self.bin_dir, self.socket_path, list(self.table.entry_points), self.fallback_dir)
        log = (self.log_path or self.directory / "warm.log").open("ab")
        env = dict(os.environ)
        env.update(self.env)
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fork server exited with {self.proc.returncode}")
            if self.listening():
                return
            time.sleep(0.05)
        kill_pids([self.proc.pid], 5.0)  # never a parent that might listen later beside the next start's
        self.proc.wait(timeout=5.0)
        raise TimeoutError("fork server did not start listening")

    def listening(self) -> bool:
        """The parent accepts connections (the probe's empty request is refused by the parent and costs nothing)."""
        with socket.socket(socket.AF_UNIX) as probe:
            return self.socket_path.exists() and probe.connect_ex(str(self.socket_path)) == 0

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
        """Every live process the parent forked (and their descendants)."""
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


def main(default: ForkTable | None = None) -> None:
    """`serve --socket S [--parent-pid P] [--entry NAME=module:attr ...] [--preload M ...] [--prepare module:attr]`;
    without --entry, `default` (a domain module's own table)."""
    parser = argparse.ArgumentParser(description="midgate fork server (runtime/fork_server.py)")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument(
        "--parent-pid", "--agent-pid", type=int, default=None, help="exit once this process is no longer our parent"
    )
    parser.add_argument("--entry", action="append", default=[], help="NAME=module:attribute, a program to fork")
    parser.add_argument("--preload", action="append", default=[], help="a module to import before the first fork")
    parser.add_argument("--prepare", default=None, help="module:attribute called in the child with the program's name")
    args = parser.parse_args()
    if args.entry:
        entries: dict[str, str] = {}
        for entry in args.entry:
            name, sep, target = entry.partition("=")
            if not sep:
                parser.error(f"--entry {entry!r}: expected NAME=module:attribute")
            entries[name] = target
        table = ForkTable(entries, tuple(args.preload), args.prepare)
    elif default is not None:
        table = default
    else:
        parser.error("no --entry and no default table")
    serve(args.socket, table, args.parent_pid)


if __name__ == "__main__":
    main()
