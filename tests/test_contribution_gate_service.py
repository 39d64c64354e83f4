"""The contribution cross-check in `coordinator serve` with real processes, no training: Mosquitto, `serve` with its
SuperLink (so reports are cross-checked), two enrolled agents invited to run 5 whose spool bodies name round 1 of it
before any capture of it exists. Both reports wait (acknowledged, not logged); `serve` is SIGKILLed and restarted; then
the round's capture appears: the report naming the captured update is logged and receipted, the other is refused
`update_mismatch`, flagged, and settled as refused in its agent's outbox. The run's job record (as `job start` keeps
it) names each agent's invitation nonce; a report the honest agent signed while its invitation carried the other
agent's nonce is refused `wrong_round_nonce` on arrival, without waiting for the capture and without a flag."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
from fl_stack import flags, outbox_refused, start_federated_coordinator
from mqtt_fixtures import AgentHandle, MessagingStack, contribution_body, round_nonce, wait_until, write_job_record

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, RoundCapture
from coordinator.federation.superlink_process import kill_pids
from edge.agent.membership import Membership, load_memberships
from edge.federated.spool import write_body
from protocol.tasks.arrays import arrays_sha256

pytest_plugins = ["mqtt_fixtures"]

RUN, ROUND = 5, 1


def _arrays(node: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), float(node % 1000), np.float32)}


GLOBAL = arrays_sha256({"w": np.zeros((2, 3), np.float32)})


def _membership(handle: AgentHandle) -> Membership:
    (membership,) = load_memberships(handle.data_dir / "mids")
    return membership


def _report(handle: AgentHandle, update_sha256: str, server_round: int = ROUND) -> None:
    """A spool body of run RUN for the agent's own Flower node."""
    node = _membership(handle).record.flower_node_id
    body = contribution_body(
        1,
        handle.device,
        run_id=RUN,
        round=server_round,
        node_id=node,
        global_model_sha256=GLOBAL,
        update_sha256=update_sha256,
    )
    write_body(handle.spool, body)


def _refused(handle: AgentHandle) -> list[str]:
    return [reason for _, reason in outbox_refused(handle)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_waiting_reports_survive_a_killed_coordinator_and_are_settled_when_the_capture_appears(
    messaging_stack: MessagingStack,
) -> None:
    stack = messaging_stack
    start_federated_coordinator(stack, "capture_poll_s = 0.1\n")
    coordinator = stack.coordinator
    assert coordinator is not None
    honest, liar = stack.enrol_agent("honest"), stack.enrol_agent("liar")
    nodes = {h.name: _membership(h).record.flower_node_id for h in (honest, liar)}
    assert all(nodes.values())
    book = stack.data_dir / "federation" / "job-book"
    write_job_record(book, "job-5", RUN, {h.device: (nodes[h.name], round_nonce(h.device)) for h in (honest, liar)})
    for handle in (honest, liar):
        stack.start_agent(handle)
    # First an invitation to the run carrying the liar's nonce: the honest agent signs its round-2 body with it.
    stack.invite_to_run(honest, RUN, nonce=round_nonce(liar.device))
    _report(honest, arrays_sha256(_arrays(nodes["honest"])), server_round=2)
    wait_until(lambda: honest.outbox_counts()[0] + len(_refused(honest)) == 1, 30, "the round-2 report signed")
    for handle in (honest, liar):
        stack.invite_to_run(handle, RUN)
    _report(honest, arrays_sha256(_arrays(nodes["honest"])))
    _report(liar, arrays_sha256({"w": np.ones((2, 3), np.float32)}))

    wait_until(lambda: stack.metric("midgate_contributions_pending") == 2, 60, "both reports waiting")
    wait_until(lambda: _refused(honest) == ["wrong_round_nonce"], 60, "the other agent's nonce refused at once")
    assert stack.metric("midgate_ingest_rejected_total", 'reason="wrong_round_nonce"') == 1
    assert stack.ledger_contributions() == []
    assert honest.outbox_counts() == (1, 0) and liar.outbox_counts() == (1, 0)

    # A crash with both reports waiting: they were acknowledged to the broker, so only the coordinator holds them.
    assert coordinator.proc is not None
    below = [p.pid for p in psutil.Process(coordinator.proc.pid).children(recursive=True)]
    coordinator.kill()
    kill_pids(below, 5.0)  # the SuperLink runs in its own process group
    stack.start_coordinator()

    updates = tuple(
        CapturedUpdate(ROUND, node, _arrays(node), arrays_sha256(_arrays(node)), GLOBAL, 10, 10, {})
        for node in nodes.values()
    )
    CaptureDirectory(stack.data_dir / "federation" / "jobs" / f"run-{RUN}").on_round(
        RoundCapture(RUN, ROUND, GLOBAL, updates, ())
    )
    wait_until(lambda: honest.outbox_counts() == (0, 1), 60, "the matching report receipted")
    wait_until(lambda: _refused(liar) == ["update_mismatch"], 60, "the false report refused at its agent")
    assert liar.outbox_counts() == (0, 0)

    (logged,) = stack.ledger_contributions()
    assert logged[0] == _membership(honest).key.key_id.hex()
    assert _refused(honest) == ["wrong_round_nonce"]
    (flag,) = flags(stack.config)  # the nonce refusal flags no one
    assert (flag["device"], flag["reason"], flag["node_id"]) == (liar.device, "update_mismatch", str(nodes["liar"]))
    assert stack.metric("midgate_contributions_pending") == 0
    assert stack.metric("midgate_ingest_rejected_total", 'reason="update_mismatch"') >= 1
