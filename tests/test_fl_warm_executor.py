"""The warm executor: launchers reach the warm parent, which forks the real Flower entry point with the launcher's
argv, environment, working directory and standard streams, and the launcher exits with the child's status."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from mqtt_fixtures import free_port, wait_exited, wait_until

from edge.federated.acceleration.warm_executor import WarmExecutor, install_launchers

pytestmark = pytest.mark.slow  # real processes


def _retrying_supernode(bin_dir: Path) -> list[str]:
    """A SuperNode (with its SuperExec) that retries a closed SuperLink port until it is told to stop."""
    return [
        str(bin_dir / "midgate-supernode"), "--superlink", "127.0.0.1:9", "--insecure", "--isolation", "process",
        "--host", "127.0.0.1", "--port", str(free_port()),
    ]  # fmt: skip


@pytest.fixture
def warm(tmp_path: Path) -> Iterator[WarmExecutor]:
    executor = WarmExecutor(tmp_path / "warm")
    executor.start()
    try:
        yield executor
    finally:
        executor.stop()
        print((tmp_path / "warm" / "warm.log").read_text(errors="replace")[-4000:])


def test_launcher_runs_the_flower_entry_point_in_a_forked_child(warm: WarmExecutor, tmp_path: Path) -> None:
    out = subprocess.run(
        [str(warm.bin_dir / "midgate-supernode"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0
    assert "usage: midgate-supernode" in out.stdout  # argv[0] and the stdout descriptor reached the child
    children = psutil.Process(warm.pids()[0]).children()
    assert children == []  # the child was reaped


def test_launcher_returns_the_child_exit_status_and_stderr(warm: WarmExecutor) -> None:
    out = subprocess.run(
        [str(warm.bin_dir / "flwr-clientapp"), "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2  # argparse's usage error, from the forked Flower entry point
    assert "flwr-clientapp: error:" in out.stderr  # the child's stderr is the launcher's


def test_launcher_forwards_sigterm_to_the_child(warm: WarmExecutor, tmp_path: Path) -> None:
    # A SuperNode pointed at a closed port keeps retrying until it is told to stop.
    launcher = subprocess.Popen(
        _retrying_supernode(warm.bin_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path / "home")},
    )
    try:
        parent = psutil.Process(warm.pids()[0])
        deadline = time.monotonic() + 30
        while not parent.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = parent.children()
        assert launcher.poll() is None
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=30)
        gone, _ = psutil.wait_procs([child], timeout=30)
        assert gone == [child]
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def test_launcher_falls_back_to_the_plain_command_without_a_warm_parent(tmp_path: Path) -> None:
    bin_dir = install_launchers(tmp_path / "bin", tmp_path / "absent.sock")
    out = subprocess.run(
        [str(bin_dir / "midgate-supernode"), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and "usage: midgate-supernode" in out.stdout


# The SuperNode's own log lines around a message pull (flwr/supernode/start_client_internal.py), as its log holds them.
def test_a_folder_too_deep_for_a_unix_socket_gets_a_private_socket_folder(tmp_path: Path) -> None:
    deep = tmp_path / ("agent-data-" + "x" * 40) / "mids" / "riverside" / "jobs" / ("job-" + "y" * 40) / "warm"
    executor = WarmExecutor(deep)
    assert len(os.fsencode(deep / "warm.sock")) > 108  # what bind() refuses: the agent's job folders get this deep
    executor.start()
    socket_dir = executor.socket_path.parent
    try:
        assert socket_dir != deep and stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        out = subprocess.run(
            [str(executor.bin_dir / "midgate-supernode"), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0 and "usage: midgate-supernode" in out.stdout
    finally:
        executor.stop()
        print((deep / "warm.log").read_text(errors="replace")[-4000:])
    assert not socket_dir.exists()


def test_a_kept_warm_executor_starts_once_and_outlives_what_it_forked(tmp_path: Path) -> None:
    """The agent's kept executor (keep_warm_executor): a second `ensure_started` and two started at once find one
    parent; `stop_children` ends a forked SuperNode and leaves the parent listening for the next job's."""
    executor = WarmExecutor(tmp_path / "warm")
    launchers: list[subprocess.Popen[bytes]] = []
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda _: executor.ensure_started(), range(2)))
        parent = executor.pids()
        assert len(parent) == 1
        executor.ensure_started()
        assert executor.pids() == parent

        def fork_supernode() -> psutil.Process:
            launchers.append(
                subprocess.Popen(
                    _retrying_supernode(executor.bin_dir),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_HOME": str(tmp_path / "home")},
                )
            )
            wait_until(lambda: bool(forked()), 30, "the parent's fork")
            (child,) = forked()
            return child

        def forked() -> list[psutil.Process]:
            """The parent's forks: its direct children that carry its command line (a fork keeps it). Not what an
            import of the parent may run for a moment (ldconfig, uname), seen beside the fork on a loaded machine."""
            with contextlib.suppress(psutil.Error):
                warm = psutil.Process(parent[0])
                return [c for c in warm.children() if c.cmdline() == warm.cmdline()]
            return []

        child = fork_supernode()
        executor.stop_children(grace=5.0)
        gone, _ = psutil.wait_procs([child], timeout=30)
        assert gone == [child] and executor.pids() == parent
        assert launchers[0].wait(timeout=30) != 0  # the launcher exits with its child's (killed) status
        second = fork_supernode()  # the same parent forks the next job's
        assert second.pid != child.pid and second.ppid() == parent[0] and executor.pids()[0] == parent[0]
    finally:
        executor.stop()
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.kill()
            launcher.wait()
    assert executor.pids() == []


def test_a_warm_parent_whose_agent_dies_during_its_imports_exits(tmp_path: Path) -> None:
    """An agent killed while its warm parent still imports torch and Flower: the parent notices once it is up and
    exits, instead of listening for ever with nobody to fork for (seen: one left behind for 40 minutes)."""
    socket_path = Path(tempfile.mkdtemp(prefix="mg-warm-")) / "warm.sock"  # short: a unix socket path has 108 bytes
    # A stand-in agent: starts the warm parent as WarmExecutor.start does and dies at once, before the parent's
    # imports are done (here: before its interpreter has even started serve()).
    agent = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-P', '-m',"
            " 'edge.federated.acceleration.warm_executor', 'serve', '--socket', sys.argv[1],"
            " '--agent-pid', str(os.getpid())], stdout=open(sys.argv[2], 'w'), stderr=subprocess.STDOUT); print(p.pid)",
            str(socket_path),
            str(tmp_path / "warm.log"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    orphan = psutil.Process(int(agent.stdout))
    try:
        wait_exited(orphan, 120, "the orphaned warm parent to exit")
        assert not socket_path.exists()
    finally:
        if orphan.is_running():
            orphan.kill()
        print((tmp_path / "warm.log").read_text(errors="replace")[-4000:])
