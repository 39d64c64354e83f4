"""Memory of an idle `midgate agent run` as a Raspberry Pi hub runs it (BENCHMARKS.md, "Raspberry Pi hub").

A real Mosquitto and `midgate coordinator serve`, one enrolled agent with the Pi's config (host sensor, no warm
executor), connected and idle (no job): its RSS and PSS are sampled every 0.5 s for `--seconds` and the peak
printed (the member page served, as by default), and, as the floor it stands on, a Python that only imports what
`agent run` imports, beside the same with numpy (the baseline: what the idle agent imported before). Target: idle
agent <= 50 MB RSS.

Command: flock /tmp/bench.lock .venv/bin/python bench/agent_idle_bench.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mqtt_fixtures import MessagingStack, wait_until  # noqa: E402

PI_EXTRA = 'keep_warm_executor = false\n[[sensors]]\ndriver = "linux"\nname = "host"\nperiod_ms = 5000\n'
IMPORTS = "import midgate_cli, edge.agent.daemon, uvloop, aiomqtt"


def peak_mb(pid: int, seconds: float) -> tuple[float, float]:
    """(peak RSS, peak PSS) in MB of `pid` and its children over `seconds`."""
    proc = psutil.Process(pid)
    rss = pss = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        procs = [proc, *proc.children(recursive=True)]
        infos = [p.memory_full_info() for p in procs]
        rss = max(rss, sum(i.rss for i in infos) / 2**20)
        pss = max(pss, sum(i.pss for i in infos) / 2**20)
        time.sleep(0.5)
    return rss, pss


def import_floor(extra: str = "") -> float:
    """RSS in MB of a Python that imports what `agent run` imports (and `extra`)."""
    code = f"{IMPORTS}\n{extra}\nimport psutil; print(psutil.Process().memory_info().rss / 2**20)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return float(out.stdout.strip())


def idle_agent(root: Path, seconds: float) -> tuple[float, float]:
    stack = MessagingStack(root)
    try:
        stack.start_broker()
        stack.start_coordinator()
        handle = stack.enrol_agent("pi", PI_EXTRA, heartbeat_s=None)
        agent = stack.start_agent(handle)
        status = handle.data_dir / "mids" / handle.mid / "daemon-status.json"
        wait_until(lambda: status.exists() and json.loads(status.read_text())["connected"], 60, "agent connected")
        time.sleep(5)  # past the start: the first heartbeat, the first samples, the first receipt poll
        assert agent.proc is not None
        return peak_mb(agent.proc.pid, seconds)
    finally:
        stack.close(failed=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        floor = import_floor()
        # The baseline: until commit 0e36ebf the idle agent imported numpy with its sample store.
        with_numpy = import_floor("import numpy")
        rss, pss = idle_agent(Path(tmp), args.seconds)
    print(f"imports of `agent run` alone: {floor:.1f} MB RSS; with numpy as before: {with_numpy:.1f} MB")
    print(f"idle agent (peak over {args.seconds:.0f} s): {rss:.1f} MB RSS, {pss:.1f} MB PSS (target 50 MB RSS)")


if __name__ == "__main__":
    main()
