"""The processes the demo starts: each in its own session with its log in the demo's folder, tracked by PID, and all
of them stopped when the demo ends, whether it finished, failed or was interrupted.

Every process gets its own session so that a Ctrl-C in the terminal reaches only the demo, which then stops the
others in order (members' agents first, the coordinator, the broker last) instead of every process dying at once.
Flower's processes below an agent or `serve` detach into sessions of their own; `stop_process_group` ends those by
PID too (coordinator.federation.superlink_process).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.federation.superlink_process import descendants, stop_process_group

MIDGATE = [sys.executable, "-P", "-c", "from midgate_cli import app; app()"]
"""`midgate` as this interpreter runs it: the code the demo itself runs, whether installed or on PYTHONPATH, and
never the working directory on sys.path (`-P`: the demo's folder holds a data folder named `coordinator`, which would
shadow the package)."""


class DemoStepError(RuntimeError):
    """A step did not turn out as it must for the next one; the message says what was seen, the log where."""


@dataclass
class Service:
    """One long-running process the demo started."""

    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-chars:]


@dataclass
class Processes:
    """Every process the demo started, all stopped by `stop_all` (also on Ctrl-C and SIGTERM).

    workdir: the demo's folder; commands run there, so their paths print short.
    logs: where each process's standard output and error go, one file per process.
    """

    workdir: Path
    logs: Path
    services: list[Service] = field(default_factory=list)
    started_pids: list[int] = field(default_factory=list)
    """Every PID the demo started directly, in order, and every PID found below them before they were stopped."""

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
        """Start a long-running process `name` (its log: logs/NAME.log)."""
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "110", **(env or {})},
                start_new_session=True,
            )
        service = Service(name, argv, log, proc)
        self.services.append(service)
        self.started_pids.append(proc.pid)
        return service

    def run_all(
        self, commands: list[tuple[str, list[str]]], timeout_s: float, check: bool = True
    ) -> list[subprocess.CompletedProcess[str]]:
        """Run (name, argv) commands side by side to completion, each tracked like a service while it runs (so
        `stop_all` ends it on Ctrl-C), its output in logs/NAME.log; their results in order, stdout and stderr
        together. Raises DemoStepError when one runs past `timeout_s`, or exits non-zero and `check`."""
        started = [self.start(name, argv) for name, argv in commands]
        deadline = time.monotonic() + timeout_s
        for service in started:
            try:
                service.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise DemoStepError(f"{service.name} ran past {timeout_s:.0f} s (log: {service.log})") from None
        results = []
        for service in started:
            self.services.remove(service)
            output = service.log.read_text(errors="replace")
            results.append(subprocess.CompletedProcess(service.argv, service.proc.returncode, output, ""))
            if check and service.proc.returncode != 0:
                raise DemoStepError(f"`{shown(service.argv)}` exited {service.proc.returncode}:\n{output[-2000:]}")
        return results

    def stop(self, service: Service) -> None:
        """SIGTERM the service's process group, SIGKILL what outlives it, then what it had detached below it."""
        below = descendants(service.proc.pid)
        self.started_pids.extend(below)
        stop_process_group(service.proc, grace=15.0)

    def stop_all(self, report: Callable[[str], None]) -> None:
        """Stop every service at once (each is SIGTERMed, then SIGKILLed after its grace), and everything found
        below them; `report` gets one line per service that was still running."""
        services, self.services = self.services[::-1], []
        running = [s for s in services if s.alive]
        with ThreadPoolExecutor(max_workers=max(1, len(services))) as pool:
            list(pool.map(self.stop, services))
        for service in running:
            report(f"stopped {service.name} (pid {service.proc.pid}, exit {service.proc.returncode})")


def shown(argv: list[str]) -> str:
    """A command line as a person would type it: `midgate ...` rather than the interpreter running it."""
    words = ["midgate", *argv[len(MIDGATE) :]] if argv[: len(MIDGATE)] == MIDGATE else argv
    return shlex.join(words)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    """Poll `predicate` until it holds; DemoStepError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            raise DemoStepError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)
