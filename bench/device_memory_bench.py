"""A device's memory during a job, part by part, on real processes configured as on a Raspberry Pi hub (issue 21).

Setup (tests/fl_stack.py, as the job tests run it): Mosquitto, `midgate coordinator serve` with its SuperLink, two
enrolled `midgate agent run` devices replaying PLAID with the Pi's agent.toml setting `keep_warm_executor = false`
(deploy/raspberrypi/agent.toml.template), and `midgate coordinator job start --rounds R`. Device m0's process tree
is sampled every 0.2 s from the invitation to the job's end: PSS, and its anonymous and file-backed shares
(/proc/PID/smaps_rollup: Pss_Anon, Pss_File), per part -- the agent, the warm parent the job's Flower processes are
forked from, SuperNode, SuperExec (a thread of the SuperNode's process since midgate-supernode: 0 MB), ClientApp,
and the fork server's launcher scripts -- and the peak of the sum. With the Pi's setting the device now runs a job
as one process (`midgate-supernode --clientapp-threads`: SuperNode, SuperExec and ClientApps in it, no warm
parent), so every part but the agent and the SuperNode is 0 there.

PSS divides each page among the processes that map it: the forked parts share the warm parent's pages, so their sum
counts those once. File-backed pages (the libraries' code) are also shared with any other process on this machine
that maps the same files (other engineers' torch processes here), which lowers Pss_File below what a Pi with only
the agent would show; Pss_Anon has no such share and is the part no page cache reclaim can take back.

The baseline is the code of a named commit (default: the merge base with main) run in the same way in the same run,
from a `git archive` of it: `configs` names "baseline" and "current" (this tree).

`--limit-mb M` runs the current tree's device m0 in a cgroup v1 memory group limited to M MB (tests/memory_cgroup.py)
and reports its peak usage, limit hits and OOM kills; `--bisect LOW HIGH` searches the smallest such limit (MB,
within --step) under which the job still completes.

Run: flock /tmp/bench.lock .venv/bin/python bench/device_memory_bench.py [--rounds 2] [--configs baseline current]
     [--limit-mb 560] [--bisect 250 560 --step 16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from git_revision import export_revision

if TYPE_CHECKING:
    from memory_cgroup import MemoryGroup

HERE = Path(__file__).resolve().parents[1]
JOB = "bench-device-memory"
PI_SETTINGS = "keep_warm_executor = false"
PARTS = ("agent", "warm parent", "SuperNode", "SuperExec", "ClientApp", "launchers", "other")
# midgate-supernode: the SuperNode with its SuperExec in a thread (edge/federated/supernode_main.py); a baseline
# before it forks flower-supernode and flower-superexec.
FORKED = {
    "midgate-supernode": "SuperNode",
    "flower-supernode": "SuperNode",
    "flower-superexec": "SuperExec",
    "flwr-clientapp": "ClientApp",
}
_FORK_LINE = re.compile(r"fork server: forked (\S+) as pid (\d+)")
MB = 1 << 20


def rollup(pid: int) -> tuple[int, int, int, int] | None:
    """(Pss, Pss_Anon, Pss_File, Private_Clean + Private_Dirty) of one process in bytes, None once it is gone. The
    last (USS) is what the process alone holds: what its end would free."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    fields = dict(line.split()[:2] for line in text.splitlines()[1:])
    pss, anon, file, clean, dirty = (
        int(fields[key]) * 1024 for key in ("Pss:", "Pss_Anon:", "Pss_File:", "Private_Clean:", "Private_Dirty:")
    )
    return pss, anon, file, clean + dirty


@dataclass
class PartSample:
    pss: int = 0
    anon: int = 0
    file: int = 0
    uss: int = 0

    def add(self, figures: tuple[int, int, int, int]) -> None:
        self.pss += figures[0]
        self.anon += figures[1]
        self.file += figures[2]
        self.uss += figures[3]

    def as_mb(self) -> dict[str, float]:
        return {key: round(getattr(self, key) / MB, 1) for key in ("pss", "anon", "file", "uss")}


@dataclass
class DeviceSampler:
    """Samples one agent's process tree until stopped; keeps the peak of the summed PSS with its parts, and each
    part's own peak. The forked processes carry their parent's command line, so which program a child of the warm
    parent runs is read from the fork server's log ("forked NAME as pid N") under the agent's data folder."""

    agent_pid: int
    data_dir: Path
    interval_s: float = 0.2
    peak: dict[str, PartSample] = field(default_factory=dict)
    part_peaks: dict[str, PartSample] = field(default_factory=dict)
    samples: int = 0
    dropped: int = 0
    _programs: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _forked(self) -> dict[int, str]:
        for log in self.data_dir.glob("mids/*/**/warm.log"):
            for name, pid in _FORK_LINE.findall(log.read_text(errors="replace")):
                self._programs[int(pid)] = FORKED.get(name, "other")
        return self._programs

    def part_of(self, proc: psutil.Process) -> str:
        if proc.pid == self.agent_pid:
            return "agent"
        cmdline = " ".join(proc.cmdline())
        if "/warm/bin/" in cmdline:
            return "launchers"
        program = self._programs.get(proc.pid) or self._forked().get(proc.pid)
        if program is not None:
            return program
        if "warm_executor" in cmdline:
            return "warm parent"
        # Started, not forked: a SuperNode with its SuperExec and ClientApps in threads (keep_warm_executor = false),
        # or Flower's own processes (flower_acceleration = false).
        return next((part for name, part in FORKED.items() if f"/{name} " in f"{cmdline} "), "other")

    def _tree(self) -> list[psutil.Process]:
        agent = psutil.Process(self.agent_pid)
        return [agent, *agent.children(recursive=True)]

    def sample(self) -> None:
        """One look at every process of the tree; a look during which a process forked or exited is dropped, since a
        page then counted with another number of sharers than it has (a parent read before its fork, its child
        after) would inflate the sum."""
        try:
            procs = self._tree()
        except psutil.Error:
            return
        parts = {name: PartSample() for name in PARTS}
        for proc in procs:
            with_figures = rollup(proc.pid)
            try:
                name = self.part_of(proc)
            except psutil.Error:
                continue
            if with_figures is not None:
                parts[name].add(with_figures)
        try:
            if {p.pid for p in self._tree()} != {p.pid for p in procs}:
                self.dropped += 1
                return
        except psutil.Error:
            return
        self.samples += 1
        if sum(p.pss for p in parts.values()) > sum(p.pss for p in self.peak.values()):
            self.peak = parts
        for name, part in parts.items():
            if part.pss > self.part_peaks.get(name, PartSample()).pss:
                self.part_peaks[name] = part

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    @contextmanager
    def sampling(self) -> Iterator[DeviceSampler]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()

    def report(self) -> dict[str, object]:
        keys = ("pss", "anon", "file", "uss")
        total = PartSample(*(sum(getattr(p, key) for p in self.peak.values()) for key in keys))
        return {
            "peak": total.as_mb(),
            "at_peak": {name: part.as_mb() for name, part in self.peak.items() if part.pss},
            "part_peaks": {name: part.as_mb() for name, part in self.part_peaks.items() if part.pss},
            "samples": self.samples,
            "dropped": self.dropped,
        }


def one_job(rounds: int, limit_mb: int | None, timeout_s: float) -> dict[str, object]:
    """In a child whose sys.path starts with the tree under test: the stack, the job, device m0 sampled (inside a
    memory group of `limit_mb` when given); the figures, and whether the job completed."""
    from fl_stack import finished_job, start_federated_coordinator, start_job, start_plaid_agents, stopping_federation
    from mqtt_fixtures import AgentHandle, MessagingStack

    with tempfile.TemporaryDirectory(prefix="bench-devmem-") as tmp:
        stack = MessagingStack(Path(tmp))
        try:
            start_federated_coordinator(stack)
            with memory_group_of(limit_mb) as group:

                def start(handle: AgentHandle) -> None:
                    with group.joined() if group is not None and handle.name == "m0" else nullcontext():
                        stack.start_agent(handle)

                # Without a group, the fixtures' own start: a baseline commit's start_plaid_agents may predate `start`.
                starting = {} if group is None else {"start": start}
                agents = start_plaid_agents(stack, 2, extra=PI_SETTINGS, **starting)
                device = agents[0][0]
                assert device.process is not None and device.process.proc is not None
                with stopping_federation(stack, agents) as teardown:
                    sampler = DeviceSampler(device.process.proc.pid, device.data_dir)
                    with sampler.sampling():
                        job = start_job(stack, teardown, JOB, rounds)
                        job_s = None
                        try:
                            book = finished_job(stack, job, JOB, timeout_s=timeout_s)
                            completed = book.flower_status == "finished:completed"
                            if book.ended_ms is not None:  # from `job start` to its end: joins and rounds
                                job_s = round((book.ended_ms - book.started_ms) / 1000, 1)
                        except (AssertionError, subprocess.TimeoutExpired) as exc:
                            print(f"job did not complete: {str(exc)[-2000:]}", file=sys.stderr)
                            completed = False
                    result: dict[str, object] = {"completed": completed, "job_s": job_s, **sampler.report()}
                    if group is not None:
                        result["cgroup"] = {
                            "limit_mb": limit_mb,
                            "max_usage_mb": round(group.max_usage_bytes / MB, 1),
                            "failcnt": group.failcnt,
                            "oom_kills": group.oom_kills,
                        }
        finally:
            stack.close(failed=False)
    return result


@contextmanager
def memory_group_of(limit_mb: int | None) -> Iterator[MemoryGroup | None]:
    """A fresh memory group of `limit_mb` (tests/memory_cgroup.py) that device m0's agent will start in, or None."""
    if limit_mb is None:
        yield None
        return
    from memory_cgroup import memory_group, unwritable_reason

    reason = unwritable_reason()
    if reason is not None:
        raise SystemExit(reason)
    with memory_group(f"midgate-bench-{os.getpid()}", limit_mb * MB) as group:
        yield group


def run_child(tree: Path, rounds: int, limit_mb: int | None, timeout_s: float = 600) -> dict[str, object]:
    """One job in a child process whose code (the agent's, Flower processes', the fixtures') is `tree`'s; a job
    not finished after `timeout_s` did not complete."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(tree), "--rounds", str(rounds)]
    argv += ["--job-timeout", str(timeout_s)]
    if limit_mb is not None:
        argv += ["--limit-mb", str(limit_mb)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(argv, env=env, cwd=tree, stdout=subprocess.PIPE, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"completed": False, "error": f"child exited {done.returncode}"}
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def print_result(name: str, result: dict[str, object]) -> None:
    peak = result.get("peak", {})
    print(f"{name}: job completed {result['completed']} in {result.get('job_s')} s, device peak PSS {peak}")
    print(f"    samples {result.get('samples')}, dropped (a fork or exit during the look) {result.get('dropped')}")
    for part, figures in dict(result.get("at_peak", {})).items():  # type: ignore[call-overload]
        print(f"    at the peak  {part:12s} {figures}")
    for part, figures in dict(result.get("part_peaks", {})).items():  # type: ignore[call-overload]
        print(f"    own peak     {part:12s} {figures}")
    if "cgroup" in result:
        print(f"    cgroup {result['cgroup']}")


def bisect(low: int, high: int, step: int, rounds: int) -> int | None:
    """The smallest limit (MB, within `step`) in [low, high] under which the job completes with no OOM kill."""
    best = None
    while high - low > step:
        middle = (low + high) // 2
        result = run_child(HERE, rounds, middle, timeout_s=180)
        cgroup = dict(result.get("cgroup", {}))  # type: ignore[call-overload]
        ok = bool(result["completed"]) and cgroup.get("oom_kills", 1) == 0
        print(f"limit {middle} MB: completed {result['completed']}, cgroup {cgroup}", flush=True)
        if ok:
            best, high = middle, middle
        else:
            low = middle
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=["baseline", "current"], choices=["baseline", "current"])
    parser.add_argument("--baseline-commit", default=None, help="default: git merge-base HEAD main")
    parser.add_argument("--limit-mb", type=int, default=None, help="run current's device m0 in a memory cgroup")
    parser.add_argument("--bisect", type=int, nargs=2, metavar=("LOW", "HIGH"), help="smallest limit search, MB")
    parser.add_argument("--step", type=int, default=16)
    parser.add_argument("--job-timeout", type=float, default=600, help=argparse.SUPPRESS)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.path[:0] = [str(args.child), str(args.child / "tests"), str(HERE / "tests")]
        print(json.dumps(one_job(args.rounds, args.limit_mb, args.job_timeout)))
        return
    print(f"load average at start: {os.getloadavg()}")
    if args.bisect:
        best = bisect(args.bisect[0], args.bisect[1], args.step, args.rounds)
        print(f"smallest limit under which the job completed: {best} MB (within {args.step} MB)")
        return
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-devmem-base-") as tmp:
        for name in args.configs:
            if name == "baseline":
                commit = (
                    args.baseline_commit
                    or subprocess.run(
                        ["git", "-C", str(HERE), "merge-base", "HEAD", "main"],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout.strip()
                )
                print(f"baseline: commit {commit}")
                results[name] = run_child(export_revision(commit, Path(tmp)), args.rounds, None)
            else:
                results[name] = run_child(HERE, args.rounds, args.limit_mb)
            print_result(name, results[name])
    print(f"load average at end: {os.getloadavg()}")
    if {"baseline", "current"} <= results.keys() and all(r.get("peak") for r in results.values()):
        base, now = (float(results[n]["peak"]["pss"]) for n in ("baseline", "current"))  # type: ignore[index]
        print(f"device peak PSS: current {now:.0f} MB / baseline {base:.0f} MB = {now / base:.3f} (target 300 MB)")


if __name__ == "__main__":
    main()
