"""Issue 6's acceptance test with real processes: "a device whose report names a different update hash is refused and
flagged". Mosquitto + `coordinator serve` (with its SuperLink, so contribution reports are cross-checked with the
strategy's round captures) + 3 enrolled `agent run`s with SuperNodes, a 2-round job run by `midgate coordinator job
start` (tests/fl_stack.py, as in tests/test_fl_roles_e2e.py). Two devices are honest: their reports usually arrive
before the round's capture exists, wait for it, and are then logged and receipted. One device lies: its member rewrites
the ClientApp's bodies on disk to name another update hash before the agent signs them. The coordinator refuses those
reports (`update_mismatch`), keeps them out of the ledger, flags the device with the signed evidence (`midgate
coordinator flags`) and sends a MID-signed Refusal; the agent moves them out of its outbox and stops resending them."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from fl_stack import (
    checked_ledger_reports,
    finished_job,
    flags,
    job_nonces,
    job_run_dir,
    outbox_refused,
    start_federated_coordinator,
    start_job,
    start_plaid_agents,
    stop_agent,
    stopping_federation,
)
from mqtt_fixtures import AgentHandle, MessagingStack, wait_until

from coordinator.capture.directory import CaptureDirectory
from coordinator.federation.job import JobOutcome
from edge.agent.membership import load_memberships
from edge.federated.spool import pending_files, write_body
from protocol.envelope import peek_envelope
from protocol.messages import ContributionBody

pytest_plugins = ["mqtt_fixtures"]

LIAR = "m2"


def _tamper_spool(handle: AgentHandle) -> dict[tuple[int, int], str]:
    """The liar's member rewrites each ClientApp body in the spool (the agent reads it only at start) to name another
    update hash; returns (node, round) -> the hash it now claims."""
    claimed = {}
    for path in pending_files(handle.spool, 10):
        body = ContributionBody.parse(path.read_bytes())
        lie = hashlib.sha256(b"not the update I sent" + path.name.encode()).hexdigest()
        write_body(handle.spool, ContributionBody(**{**dict(body), "update_sha256": lie}))  # same name: replaced
        claimed[(body.node_id, body.round)] = lie
    return claimed


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_device_whose_reports_name_another_update_hash_is_refused_and_flagged(
    messaging_stack: MessagingStack,
) -> None:
    stack = messaging_stack
    start_federated_coordinator(stack)
    # The liar's agent polls its spool only at start, so its member can edit the records before it signs them.
    agents = start_plaid_agents(stack, 3, spool_poll_s={LIAR: 3600.0})
    broker = stack.broker
    assert broker is not None
    honest = [(h, r) for h, r in agents if h.name != LIAR]
    ((liar, liar_record),) = [(h, r) for h, r in agents if h.name == LIAR]

    with stopping_federation(stack, agents) as teardown:
        book = finished_job(stack, start_job(stack, teardown, "job-1", 2), "job-1")
        assert book.flower_status == "finished:completed"
        nonces = job_nonces(book)
        run_dir = job_run_dir(stack, book)
        outcome = JobOutcome.read(run_dir)
        assert outcome.status == "finished" and outcome.rounds_completed == 2 and outcome.drops == []

        # Every round's report of every honest node is in the ledger and receipted back to its agent.
        wait_until(
            lambda: all(h.outbox_counts()[0] == 0 and h.outbox_counts()[1] >= 2 for h, _ in honest),
            120,
            "every honest report receipted",
        )

        # The liar's member edits the bodies its agent has not taken in yet, then the agent starts over.
        wait_until(lambda: len(pending_files(liar.spool, 10)) == 2, 30, "the liar's two bodies")
        assert liar.process is not None and liar.process.proc is not None
        stop_agent(liar, teardown.below)
        # The restarted agent signs them with the nonce of its invitation to the run, which it kept on disk.
        claimed = _tamper_spool(liar)
        stack.start_agent(liar)
        wait_until(lambda: len(outbox_refused(liar)) == 2, 60, "the liar's agent told of both refusals")
        assert liar.outbox_counts() == (0, 0)  # nothing pending: nothing is resent; nothing receipted
        assert [reason for _, reason in outbox_refused(liar)] == ["update_mismatch", "update_mismatch"]

        captures = CaptureDirectory(run_dir)
        flagged = flags(stack.config)
        assert {(f["device"], f["reason"], f["flagged"]) for f in flagged} == {(liar.device, "update_mismatch", True)}
        assert len(flagged) == 2
        for flag in flagged:
            node, rnd = int(str(flag["node_id"])), int(str(flag["round"]))
            assert node == liar_record.flower_node_id
            capture = flag["capture"]
            assert isinstance(capture, dict)
            captured = {u.node_id: u.update_sha256 for u in captures.load_round(rnd).updates}
            assert capture["update_sha256"] == captured[node] != claimed[(node, rnd)]
            _, payload, _ = peek_envelope(base64.b64decode(str(flag["envelope_b64"])))
            assert json.loads(payload)["update_sha256"] == claimed[(node, rnd)]  # the device's own signed claim
        assert stack.metric("midgate_ingest_rejected_total", 'reason="update_mismatch"') >= 2

        # The agent stopped resending: its reports on the broker do not grow over two more heartbeats (5 s apart),
        # longer than its 2-4 s resend backoff.
        def published(kind: str) -> int:
            return broker.log_text().count(f"'mid/{stack.mid}/dev/{liar.device}/up/{kind}'")

        reports_sent, beats = published("report"), published("heartbeat")
        wait_until(lambda: published("heartbeat") >= beats + 2, 30, "two more heartbeats from the liar")
        assert published("report") == reports_sent

        by_node = {r.flower_node_id: r for _, r in honest}
        (liar_membership,) = load_memberships(liar.data_dir / "mids")
        reports = checked_ledger_reports(stack, captures, nonces)
        assert liar_membership.key.key_id.hex() not in {r.key_id for r, _ in reports}
        assert {(r.report.node_id, r.report.round) for r, _ in reports} == {(n, r) for n in by_node for r in (1, 2)}
