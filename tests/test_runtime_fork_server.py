"""runtime.fork_server with small programs (tests/fork_programs.py, no torch: the parent is up in a fraction of a
second): a launcher is its program forked from the warm parent (argv, environment, working directory, streams, exit
status, signals, fresh module state), and every failure of the parent leaves the program started the ordinary way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mqtt_fixtures import wait_exited, wait_until

from runtime.fork_server import ForkServer, ForkTable, install_launchers

TESTS = Path(__file__).resolve().parent
TABLE = ForkTable(
    entry_points={"mg-report": "fork_programs:report", "mg-wait": "fork_programs:wait"},
    preload=("json",),
    prepare="fork_programs:prepare",
)
PLAIN = '#!/bin/sh\necho plain $0 "$@"\nexit 3\n'


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def plain_dir(tmp_path: Path) -> Path:
    """Stand-ins for the programs themselves, where a launcher falls back to."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in ("mg-report", "mg-wait", "mg-unknown"):
        (folder / name).write_text(PLAIN)
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def server(plain_dir: Path) -> Iterator[ForkServer]:
    directory = Path(tempfile.mkdtemp(prefix="mg-fork-"))  # short: a unix socket path holds 108 bytes
    fork_server = ForkServer(directory, TABLE, env=_env(), fallback_dir=plain_dir)
    fork_server.start(timeout=60)
    try:
        yield fork_server
    finally:
        fork_server.stop()
        print((directory / "warm.log").read_text(errors="replace")[-4000:])


def _run(launcher: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MARKER": "from-the-caller"}
    return subprocess.run(
        [str(launcher), *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env, check=False
    )


def test_a_launcher_is_its_program_forked_from_the_warm_parent(server: ForkServer, tmp_path: Path) -> None:
    (parent,) = server.pids()
    first = _run(server.bin_dir / "mg-report", "5", cwd=tmp_path)
    assert first.returncode == 5, first.stderr
    assert f"argv=['mg-report', '5'] cwd={tmp_path} marker=from-the-caller touched=1" in first.stdout
    assert f"ppid={parent}" in first.stdout and "prepared mg-report" in first.stderr
    assert "to stderr" in first.stderr
    second = _run(server.bin_dir / "mg-report", "0", cwd=tmp_path)
    assert second.returncode == 0
    assert "touched=1" in second.stdout  # the first child's module state did not reach the second
    assert server.child_pids() == []  # both reaped


def test_a_signal_to_the_launcher_reaches_the_child(server: ForkServer) -> None:
    launcher = subprocess.Popen([str(server.bin_dir / "mg-wait")], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        child = psutil.Process(int(launcher.stdout.readline().strip().removeprefix("pid=")))
        assert child.ppid() == server.pids()[0]
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM  # the child's death by SIGTERM, as a shell says it
        gone, _ = psutil.wait_procs([child], timeout=30)
        assert gone == [child]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_signal_before_the_fork_is_held_and_reaches_the_child(server: ForkServer) -> None:
    # The warm parent is stopped, so the launcher's request waits unanswered: the signal comes before any child.
    (parent,) = server.pids()
    os.kill(parent, signal.SIGSTOP)
    launcher = subprocess.Popen([str(server.bin_dir / "mg-wait")], stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: psutil.Process(launcher.pid).net_connections(kind="unix") != [], 30, "launcher connected")
        launcher.send_signal(signal.SIGTERM)
        os.kill(parent, signal.SIGCONT)
        assert launcher.wait(timeout=30) == 128 + signal.SIGTERM  # the child was forked, then ended by the signal
        assert "forked mg-wait" in (server.directory / "warm.log").read_text()
        wait_until(lambda: server.child_pids() == [], 30, "the child reaped")
    finally:
        os.kill(parent, signal.SIGCONT)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_stop_ends_the_parent_and_what_it_forked(server: ForkServer) -> None:
    launcher = subprocess.Popen([str(server.bin_dir / "mg-wait")], stdout=subprocess.PIPE, text=True)
    try:
        assert launcher.stdout is not None
        child = psutil.Process(int(launcher.stdout.readline().strip().removeprefix("pid=")))
        server.stop()
        gone, _ = psutil.wait_procs([child], timeout=30)
        assert gone == [child] and server.pids() == [] and not server.socket_path.exists()
        assert launcher.wait(timeout=30) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_a_launcher_without_its_warm_parent_runs_the_program_itself_and_says_why(
    server: ForkServer, plain_dir: Path, tmp_path: Path
) -> None:
    # The parent refuses a program it does not fork.
    unknown = install_launchers(tmp_path / "bin", server.socket_path, ["mg-unknown"], plain_dir) / "mg-unknown"
    refused = _run(unknown, "a")
    assert refused.returncode == 3 and f"plain {plain_dir / 'mg-unknown'} a" in refused.stdout
    assert "closed the connection without forking" in refused.stderr
    # The parent is dead (killed, its socket file left behind).
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(timeout=30)
    dead = _run(server.bin_dir / "mg-report", "0")
    assert dead.returncode == 3 and "plain" in dead.stdout
    assert "unreachable" in dead.stderr and "without it" in dead.stderr


def test_a_warm_parent_whose_owner_is_gone_exits(tmp_path: Path) -> None:
    socket_path = Path(tempfile.mkdtemp(prefix="mg-fork-")) / "warm.sock"
    # A stand-in owner: starts the parent naming itself and exits at once.
    owner = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-m', 'runtime.fork_server', 'serve',"
            " '--socket', sys.argv[1], '--parent-pid', str(os.getpid()), '--entry', 'mg-wait=fork_programs:wait'],"
            " stdout=open(sys.argv[2], 'w'), stderr=subprocess.STDOUT); print(p.pid)",
            str(socket_path),
            str(tmp_path / "warm.log"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, **_env()},
    )
    orphan = psutil.Process(int(owner.stdout))
    try:
        wait_exited(orphan, 60, "the orphaned warm parent to exit")
    finally:
        if orphan.is_running():
            orphan.kill()
        print((tmp_path / "warm.log").read_text(errors="replace")[-4000:])
