"""A job's time outside its rounds, on real processes, as a new operator runs it.

Setup (the same as tests/fl_stack.py): Mosquitto, `midgate coordinator serve` with its SuperLink, D enrolled
`midgate agent run` daemons each replaying its share of PLAID (split by label), all on this machine. Then
`midgate coordinator job start` with only a task, the devices' defaults and `--rounds R`, timed from the command's
start to its exit (Python start-up included), each line it prints stamped with the time it arrived. The job starts
once every agent has said its warm executor is ready (agent.toml's keep_warm_executor, on by default: a device that
has been up for a while) and `serve`'s warm ServerApp parent is listening (keep_warm_serverapp, on by default), unless
`--cold`: then at once, the devices' imports competing with the job.

Printed, from the same run:
- total: the command's wall time;
- rounds: the run's own round times, the wall time between consecutive global models as the ServerApp measured them
  (`outcome.json` round_seconds; round 1 runs from the initial model's evaluation, so it holds the ClientApps' start);
- outside: total - rounds: inviting, waiting for the SuperNodes, submitting the run, the run's end, the outcome and
  the JOB leaf `serve` logs, the command's exit;
- outside, strict: total - R x the median of rounds 2..R, so that round 1's one-time start counts as outside too;
- the time of each printed line (where the time outside goes).

Run: .venv/bin/python bench/job_overhead_bench.py [--devices 5] [--rounds 3] [--cold]   (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fl_stack import start_federated_coordinator, start_plaid_agents, stopping_federation  # noqa: E402
from flower_fixtures import plaid_windows  # noqa: E402
from mqtt_fixtures import PYTHON, MessagingStack, wait_until  # noqa: E402

from coordinator.federation.job import JobOutcome  # noqa: E402
from coordinator.federation.job_start import JobBook  # noqa: E402
from protocol.tasks.windows import save_window_file  # noqa: E402
from runtime.fork_server import READY_LINE  # noqa: E402

JOB = "bench-overhead"


def timed_job(stack: MessagingStack, rounds: int | None, job: str = JOB) -> tuple[float, list[tuple[float, str]], int]:
    """Run `job start` to its exit with only a task, the buyer's validation windows (PLAID's test split) and, unless
    None (the task's recipe), `--rounds`: (wall seconds, [(seconds since start, line)], exit code)."""
    validation = stack.root / "validation.npz"
    save_window_file(validation, plaid_windows("test"))
    argv = [
        PYTHON, "-c", "from midgate_cli import app; app()", "coordinator", "job", "start", job,
        "--config", str(stack.config), "--task", "plaid-appliance@1",
        "--validation", str(validation), "--purpose", "research", "--buyer", "acme",
    ]  # fmt: skip
    if rounds is not None:
        argv += ["--rounds", str(rounds)]
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic() - started, line.rstrip()))
        code = proc.wait()
    return time.monotonic() - started, lines, code


def job_on_real_processes(
    devices: int, rounds: int | None, job: str, keep: Path | None, cold: bool = False
) -> tuple[float, JobOutcome]:
    """Start the MID and `devices` PLAID agents, wait for their warm executors unless `cold`, run `timed_job`, print
    its lines as they were stamped, stop every process; the job's wall seconds and outcome. `keep`: run in this (new)
    folder and keep it."""
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        root = Path(tmp) if keep is None else keep
        root.mkdir(parents=True, exist_ok=True)
        stack = MessagingStack(root)
        try:
            start_federated_coordinator(stack)
            agents = start_plaid_agents(stack, devices)
            if not cold:
                for handle, _ in agents:
                    log = handle.workdir / "agent.log"
                    wait_until(lambda log=log: "warm executor ready" in log.read_text(), 180, "warm executor")
                # serve's warm ServerApp parent (keep_warm_serverapp, on by default), up long before the devices'
                warm = stack.data_dir / "federation" / "warm-serverapp" / "warm.log"
                wait_until(lambda: warm.exists() and READY_LINE in warm.read_text(), 180, "warm serverapp")
            print(f"load average at the job's start: {os.getloadavg()[0]:.1f}")
            with stopping_federation(stack, agents):
                total, lines, code = timed_job(stack, rounds, job)
        finally:
            stack.close(failed=False)
        for at, line in lines:
            print(f"{at:7.2f} s  {line}")
        if code != 0:
            raise SystemExit(f"job start exited {code}")
        record = JobBook(stack.data_dir / "federation" / "job-book").read(job)
        assert record is not None and record.run_id is not None
        return total, JobOutcome.read(stack.data_dir / "federation" / "jobs" / f"run-{record.run_id}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it: every process's log")
    parser.add_argument("--cold", action="store_true", help="start the job before the agents' warm executors are up")
    args = parser.parse_args()
    total, outcome = job_on_real_processes(args.devices, args.rounds, JOB, args.keep, args.cold)
    seconds = [outcome.round_seconds[r] for r in sorted(outcome.round_seconds)]
    rounds_s = sum(seconds)
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    print(
        json.dumps(
            {
                "devices": args.devices,
                "rounds": args.rounds,
                "total_s": round(total, 2),
                "round_seconds": [round(s, 2) for s in seconds],
                "rounds_s": round(rounds_s, 2),
                "outside_s": round(total - rounds_s, 2),
                "outside_strict_s": round(total - args.rounds * steady, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
