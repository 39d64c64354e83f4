"""Faults with screening workers in the path, against real processes, exact ledger counts asserted.

Mosquitto, `coordinator serve` (ingest.workers = 2), two `coordinator ingest-worker` processes and two agents.
The sequencer, then (in a second test) the broker, is SIGKILLed mid-stream and restarted: every report written ends
up in the ledger exactly once and receipted by its agent, and no worker is left holding reports awaiting a commit.
"""

from __future__ import annotations

import json

import pytest
from mqtt_fixtures import AgentHandle, MessagingStack, ServiceProcess, wait_until, write_bodies
from test_ingest_workers import _start_worker

from protocol.envelope import peek_envelope

pytest_plugins = ["mqtt_fixtures"]

REPORTS = 2000


def _finish(stack: MessagingStack, agents: list[AgentHandle], written: dict[str, set[str]]) -> None:
    def done() -> bool:
        return all(a.spool_left() == 0 and a.outbox_counts() == (0, len(written[a.device])) for a in agents)

    wait_until(done, 50, "every report receipted by its agent", poll_s=0.2)
    leaves = stack.ledger_contributions()
    hashes = [json.loads(peek_envelope(env)[1])["update_sha256"] for _, _, env in leaves]
    assert len(hashes) == REPORTS, f"ledger holds {len(hashes)} reports, {REPORTS} were written"
    assert set(hashes) == set().union(*written.values())
    assert len({(kid, seq) for kid, seq, _ in leaves}) == REPORTS


def _stop_and_check_workers(workers: list[ServiceProcess]) -> None:
    """A worker still waiting for commit notices at shutdown would hold reports the broker has not been told about."""
    for w in workers:
        w.stop()
        stopped = [json.loads(line) for line in w.log_text().splitlines() if '"worker stopped"' in line]
        assert stopped, f"{w.name} logged no shutdown counts"
        assert stopped[-1]["awaiting_commit"] == 0, f"{w.name} stopped with reports awaiting their commit"


def _print_logs(stack: MessagingStack, workers: list[ServiceProcess]) -> None:
    for w in workers:
        print(f"---- {w.name} log (tail) ----\n{w.log_text()[-6000:]}")
    if stack.coordinator is not None:
        print(f"---- coordinator log (tail) ----\n{stack.coordinator.log_text()[-6000:]}")


@pytest.mark.slow
def test_sequencer_sigkill_with_workers_loses_and_duplicates_nothing(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    stack.coordinator_extra = "workers = 2\nreceive_maximum = 100\nqueue_max = 200\nhandoff_timeout_s = 3.0"
    stack.start_broker()
    sequencer = stack.start_coordinator()
    workers = [_start_worker(stack, "w1"), _start_worker(stack, "w2")]
    try:
        agents = [stack.enrol_agent(n) for n in ("ana", "ben")]
        for a in agents:
            stack.take_invitation(a)
        written = write_bodies(agents, REPORTS)
        for a in agents:
            stack.start_agent(a)
        wait_until(lambda: len(stack.ledger_contributions()) >= 300, 40, "300 reports in the ledger", poll_s=0.05)
        sequencer.kill()
        assert len(stack.ledger_contributions()) < REPORTS, "the kill must land mid-stream"
        stack.start_coordinator()
        _finish(stack, agents, written)
        _stop_and_check_workers(workers)
    except BaseException:
        _print_logs(stack, workers)
        raise
    finally:
        for w in workers:
            w.stop()


@pytest.mark.slow
def test_broker_sigkill_with_workers_loses_and_duplicates_nothing(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    stack.coordinator_extra = "workers = 2\nreceive_maximum = 100\nqueue_max = 200\nhandoff_timeout_s = 3.0"
    broker = stack.start_broker()
    stack.start_coordinator()
    workers = [_start_worker(stack, "w1"), _start_worker(stack, "w2")]
    try:
        agents = [stack.enrol_agent(n) for n in ("ana", "ben")]
        for a in agents:
            stack.take_invitation(a)
        written = write_bodies(agents, REPORTS)
        for a in agents:
            stack.start_agent(a)
        wait_until(lambda: len(stack.ledger_contributions()) >= 300, 40, "300 reports in the ledger", poll_s=0.05)
        broker.kill()
        assert len(stack.ledger_contributions()) < REPORTS, "the kill must land mid-stream"
        broker.start()
        _finish(stack, agents, written)
        _stop_and_check_workers(workers)
    except BaseException:
        _print_logs(stack, workers)
        raise
    finally:
        for w in workers:
            w.stop()
