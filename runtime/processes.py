"""Stopping processes: the one way every service and test of midgate ends the processes it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import psutil


def end_process_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group `proc` leads (started with `start_new_session`), wait up to `grace` seconds for
    `proc`, then SIGKILL the group: its children that outlived their leader."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait(timeout=grace)


def kill_pids(pids: list[int], grace: float) -> None:
    """SIGTERM each live PID, then SIGKILL those still alive after `grace` seconds."""
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
