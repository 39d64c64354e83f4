"""The warm executor: launchers reach the warm parent, which forks the real Flower entry point with the launcher's
argv, environment, working directory and standard streams, and the launcher exits with the child's status."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from edge.federated.warm_executor import WarmExecutor, install_launchers, message_pulled, wait_for_message

pytestmark = pytest.mark.slow  # real processes


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
        [str(warm.bin_dir / "flower-superexec"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0
    assert "usage: flower-superexec" in out.stdout  # argv[0] and the stdout descriptor reached the child
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
    # A SuperExec pointed at a closed port keeps retrying until it is told to stop.
    launcher = subprocess.Popen(
        [str(warm.bin_dir / "flower-superexec"), "--runtime-api-address", "127.0.0.1:9", "--insecure"],
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
        [str(bin_dir / "flower-superexec"), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0 and "usage: flower-superexec" in out.stdout


# The SuperNode's own log lines around a message pull (flwr/supernode/start_client_internal.py), as its log holds them.
RECEIVING = b"\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: ab12)\n"
RECEIVED = b"\x1b[92mINFO \x1b[0m:      Received successfully\n"
FAILED = b"\x1b[91mERROR \x1b[0m:     Failed to receive message ab12: timeout\n"
NOISE = b'INFO:     127.0.0.1:40840 - "POST /v1/runtime/acquire-task HTTP/1.1" 200 OK\n'


@pytest.mark.parametrize(
    ("tail", "pulled"),
    [
        (NOISE, None),  # no message yet: nothing to wait for
        (NOISE + RECEIVING + NOISE, False),  # the SuperNode is still pulling the message's objects
        (RECEIVING + NOISE + RECEIVED, True),
        (RECEIVING + FAILED, True),  # nothing will arrive; Flower's ClientApp reports the failure
        (RECEIVING + RECEIVED + NOISE + RECEIVING, False),  # the earlier message's outcome does not count
    ],
)
def test_message_pulled_reads_the_last_message_in_the_supernode_log(tail: bytes, pulled: bool | None) -> None:
    assert message_pulled(tail) is pulled


def test_clientapp_waits_until_the_supernode_log_shows_its_message_pulled(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_bytes(NOISE + RECEIVING)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)  # write-only, as the ClientApp's standard output is
    try:
        assert wait_for_message(fd, timeout=0.3) >= 0.3  # still pulling: it waits out its bound
        done = threading.Event()
        waited: list[float] = []
        waiter = threading.Thread(target=lambda: (waited.append(wait_for_message(fd, timeout=120)), done.set()))
        waiter.start()
        assert not done.wait(0.3)  # still waiting for the pull
        os.write(fd, NOISE + RECEIVED)
        waiter.join(120)
        assert done.is_set() and waited[0] < 120
    finally:
        os.close(fd)


def test_clientapp_does_not_wait_without_a_log_file() -> None:
    read_end, write_end = os.pipe()
    try:
        assert wait_for_message(write_end, timeout=30) == 0.0
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_folder_too_deep_for_a_unix_socket_gets_a_private_socket_folder(tmp_path: Path) -> None:
    deep = tmp_path / ("agent-data-" + "x" * 40) / "mids" / "riverside" / "jobs" / ("job-" + "y" * 40) / "warm"
    executor = WarmExecutor(deep)
    assert len(os.fsencode(deep / "warm.sock")) > 108  # what bind() refuses: the agent's job folders get this deep
    executor.start()
    socket_dir = executor.socket_path.parent
    try:
        assert socket_dir != deep and stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        out = subprocess.run(
            [str(executor.bin_dir / "flower-superexec"), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0 and "usage: flower-superexec" in out.stdout
    finally:
        executor.stop()
        print((deep / "warm.log").read_text(errors="replace")[-4000:])
    assert not socket_dir.exists()
