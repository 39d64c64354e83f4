"""Memory of an idle agent daemon as a Raspberry Pi hub runs it (BENCHMARKS.md, "Raspberry Pi hub").

A real Mosquitto and `midgate coordinator serve`, one enrolled agent with the Pi's config (host sensor, no warm
executor), connected and idle (no job): its RSS and PSS are sampled every 0.5 s for `--seconds` and the peak
printed (the member page served, as by default). The agent runs twice in the same stack: as the Pi's unit runs it
(`midgate-agent`, midgate_agent.main) and through the typer app (`midgate_cli.app`, `agent run`, as the tests start
it). As the floor each stands on, a Python that only imports what the daemon imports: the lean entry's, and the
baseline, what `agent run` imported before (the typer app with uvloop, and numpy as until commit 0e36ebf).
Target: idle agent <= 50 MB RSS.

Command: flock /tmp/bench.lock .venv/bin/python bench/agent_idle_bench.py --seconds 15
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mqtt_fixtures import PYTHON, MessagingStack, ServiceProcess, wait_until  # noqa: E402

PI_EXTRA = 'keep_warm_executor = false\n[[sensors]]\ndriver = "linux"\nname = "host"\nperiod_ms = 5000\n'
LEAN_IMPORTS = "import midgate_agent, edge.agent.run, edge.agent.config, edge.agent.daemon, aiomqtt"
# What `agent run` imported before the lean entry: the typer app, uvloop, psutil, the member page's uvicorn and view,
# a job's SuperNode stack (imported lazily now, so named here); the baseline adds numpy, as until commit 0e36ebf.
BEFORE_IMPORTS = (
    "import midgate_cli, edge.agent.daemon, uvloop, aiomqtt, psutil, uvicorn, edge.agent.member_page_view, "
    "edge.agent.job_task, edge.federated.supervisor, edge.federated.acceleration.device"
)
BASELINE_IMPORTS = f"{BEFORE_IMPORTS}, numpy"
ENTRIES = {
    "midgate-agent (the Pi's unit)": ["from midgate_agent import main; main()"],
    "midgate agent run via the typer app": ["from midgate_cli import app; app()", "agent", "run"],
}
"""Name -> the `python -c` code that runs a console script's function, and the command's words before --config."""


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


def import_floor(imports: str) -> float:
    """RSS in MB of a Python that only runs `imports` (read from /proc: psutil itself would add to it)."""
    code = f"{imports}\nprint(int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return float(out.stdout.strip())


class AgentEntry(ServiceProcess):
    """The enrolled agent started through `entry` (one of ENTRIES)."""

    def __init__(self, name: str, entry: list[str], config: Path, log_path: Path) -> None:
        super().__init__(name, [*entry[1:], "--config", str(config)], log_path)
        self.code = entry[0]

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-c", self.code, *self.args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env
            )


def connected_or_exited(agent: AgentEntry, status: Path) -> bool:
    return not agent.alive or (status.exists() and json.loads(status.read_text())["connected"])


def idle_agents(root: Path, seconds: float) -> dict[str, tuple[float, float]]:
    """(peak RSS, peak PSS) of the idle agent started through each of ENTRIES in turn, in one messaging stack."""
    stack = MessagingStack(root)
    try:
        stack.start_broker()
        stack.start_coordinator()
        handle = stack.enrol_agent("pi", PI_EXTRA, heartbeat_s=None)
        status = handle.data_dir / "mids" / handle.mid / "daemon-status.json"
        found = {}
        for i, (name, entry) in enumerate(ENTRIES.items()):
            status.unlink(missing_ok=True)
            agent = AgentEntry(name, entry, handle.config, root / f"agent-{i}.log")
            agent.start()
            try:
                wait_until(functools.partial(connected_or_exited, agent, status), 60, f"{name} connected")
                assert agent.alive, f"{name} exited"
                time.sleep(5)  # past the start: the first heartbeat, the first samples, the first receipt poll
                assert agent.proc is not None
                found[name] = peak_mb(agent.proc.pid, seconds)
            except Exception:
                print(f"--- {name}: its log\n{agent.log_path.read_text(errors='replace')[-3000:]}", file=sys.stderr)
                raise
            finally:
                agent.stop()
        return found
    finally:
        stack.close(failed=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lean = import_floor(LEAN_IMPORTS)
        before = import_floor(BEFORE_IMPORTS)
        baseline = import_floor(BASELINE_IMPORTS)
        peaks = idle_agents(Path(tmp), args.seconds)
    print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(
        f"imports of the lean daemon: {lean:.1f} MB RSS; `agent run`'s before: {before:.1f} MB; baseline (those with "
        f"numpy, as before 0e36ebf): {baseline:.1f} MB; ratio lean / baseline {lean / baseline:.2f}"
    )
    for name, (rss, pss) in peaks.items():
        print(f"idle agent, {name} (peak over {args.seconds:.0f} s): {rss:.1f} MB RSS, {pss:.1f} MB PSS")
    print("target: idle agent <= 50 MB RSS")


if __name__ == "__main__":
    main()
