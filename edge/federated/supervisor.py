"""The agent's supervision of the device's SuperNode during a job: restart with backoff when it dies, never restart
a node the SuperLink refused, stop it (and everything below it) when the job ends, the member pauses or leaves, or
a strike starts. Between jobs no Flower process runs on the device.

One owner, explicit lifetime (`async with`), no threads: the watch loop polls the process without blocking the
agent's event loop; starting and stopping Flower processes happen in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from edge.federated.supernode import EXIT_NODE_NOT_REGISTERED, SuperNodeProcess


class SupervisorState(StrEnum):
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    REFUSED = "refused"  # the SuperLink refused a node that never joined (key not registered): restarting cannot help
    GAVE_UP = "gave_up"  # too many restarts in a row
    STOPPED = "stopped"


@dataclass
class SuperNodeSupervisor:
    """Keeps one SuperNode running for one job.

    Parameters
    ----------
    make_process: builds a fresh SuperNodeProcess (a restart starts a new one: a Popen cannot be restarted).
    initial_backoff: seconds before the first restart (default 1), doubled after each failure up to `max_backoff`
        (default 60); reset after the node stayed up for `healthy_after` seconds (default 60).
    max_restarts: consecutive restarts before giving up (default 10).
    poll_interval: seconds between liveness checks (default 0.5).
    """

    make_process: Callable[[], SuperNodeProcess]
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    healthy_after: float = 60.0
    max_restarts: int = 10
    poll_interval: float = 0.5
    state: SupervisorState = SupervisorState.STOPPED
    restarts: int = 0
    exits: list[tuple[int | None, int | None]] = field(default_factory=list)  # (exit status, Flower exit code)
    process: SuperNodeProcess | None = None
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> SuperNodeSupervisor:
        await self._start()
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start(self) -> None:
        self.process = self.make_process()
        await asyncio.to_thread(self.process.start)
        self.state = SupervisorState.RUNNING

    async def _watch(self) -> None:
        backoff = self.initial_backoff
        started = time.monotonic()
        consecutive = 0
        while True:
            await asyncio.sleep(self.poll_interval)
            proc = self.process
            if proc is None or proc.proc is None or proc.proc.poll() is None:
                if time.monotonic() - started >= self.healthy_after:
                    backoff, consecutive = self.initial_backoff, 0
                continue
            self.exits.append((proc.proc.returncode, proc.flower_exit_code()))
            await asyncio.to_thread(proc.stop)  # the rest of its process tree
            if proc.flower_exit_code() == EXIT_NODE_NOT_REGISTERED and not proc.has_joined():
                self.state = SupervisorState.REFUSED
                return
            # Flower uses the same code when a node that crashed comes back before the SuperLink has noticed it is
            # gone (the SuperLink waits 2 missed 30 s heartbeats): a node that joined before is retried.
            if consecutive >= self.max_restarts:
                self.state = SupervisorState.GAVE_UP
                return
            self.state = SupervisorState.BACKING_OFF
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
            consecutive += 1
            self.restarts += 1
            await self._start()
            started = time.monotonic()

    async def stop(self) -> None:
        """Stop watching and stop the SuperNode with everything below it."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.process is not None:
            await asyncio.to_thread(self.process.stop)
        if self.state in (SupervisorState.RUNNING, SupervisorState.BACKING_OFF):
            self.state = SupervisorState.STOPPED
