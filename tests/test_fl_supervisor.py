"""The agent's SuperNode supervision against a real SuperLink: a SuperNode that dies is restarted with backoff and
rejoins under the same node id; a refused (unregistered) node is not restarted; stopping leaves no process."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from flower_fixtures import Federation, plaid_windows, running_federation, split_by_label

from coordinator.capture.directory import CaptureDirectory
from edge.federated.supernode import EXIT_NODE_NOT_REGISTERED, SuperNodeProcess
from edge.federated.supervisor import SuperNodeSupervisor, SupervisorState

pytestmark = pytest.mark.slow


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    with running_federation(tmp_path) as fed:
        yield fed


def _fresh(template: SuperNodeProcess) -> SuperNodeProcess:
    return dataclasses.replace(template, proc=None)


def _joined_again(supervisor: SuperNodeSupervisor) -> bool:
    proc = supervisor.process
    if proc is None or proc.log_path is None or supervisor.state is not SupervisorState.RUNNING:
        return False
    return proc.log_path.read_text().count("SuperNode ID:") >= 2 and proc.proc is not None and proc.proc.poll() is None


async def _until(predicate: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def test_dead_supernode_is_restarted_and_rejoins_with_its_node_id(federation: Federation) -> None:
    device = federation.add_device("dev0", split_by_label(plaid_windows("train"), 3)[0])

    async def scenario() -> tuple[SuperNodeSupervisor, list[int]]:
        # A crashed node is refused (Flower exit code 305) until the SuperLink misses two 30 s heartbeats, so the
        # supervisor keeps retrying; a 5 s backoff cap keeps this test near that floor.
        supervisor = SuperNodeSupervisor(
            lambda: _fresh(device.supernode), initial_backoff=0.5, max_backoff=5.0, max_restarts=30, poll_interval=0.1
        )
        async with supervisor:
            first = supervisor.process
            assert first is not None and first.log_path is not None
            await _until(lambda: "SuperNode ID:" in first.log_path.read_text(), 60)  # type: ignore[union-attr]
            killed = first.kill()
            await _until(lambda: supervisor.process is not first and _joined_again(supervisor), 150)
            assert supervisor.restarts >= 1
            run_id = await asyncio.to_thread(
                federation.submit, plaid_windows("test"), **{"num-rounds": 1, "min-nodes": 1}
            )
            status, outcome = await asyncio.to_thread(federation.wait_outcome, run_id, 180)
            assert status == "finished:completed" and outcome is not None
            (update,) = CaptureDirectory(federation.run_dir(run_id)).load_round(1).updates
            assert update.node_id == device.node_id  # same key, same node id after the restart
            below = supervisor.process.pids()  # type: ignore[union-attr]
        return supervisor, killed + below

    supervisor, pids = asyncio.run(scenario())
    assert supervisor.state is SupervisorState.STOPPED
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_refused_supernode_is_not_restarted(federation: Federation) -> None:
    stranger = federation.add_device("stranger", split_by_label(plaid_windows("train"), 3)[0], register=False)

    async def scenario() -> SuperNodeSupervisor:
        supervisor = SuperNodeSupervisor(lambda: _fresh(stranger.supernode), initial_backoff=0.2, poll_interval=0.1)
        async with supervisor:
            await _until(lambda: supervisor.state is SupervisorState.REFUSED, 60)
        return supervisor

    supervisor = asyncio.run(scenario())
    assert supervisor.restarts == 0
    assert supervisor.exits[-1][1] == EXIT_NODE_NOT_REGISTERED
