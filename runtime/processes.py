"""Stopping processes: the one way every service and test of midgate ends the processes it started."""

from __future__ import annotations

import contextlib

import psutil


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
