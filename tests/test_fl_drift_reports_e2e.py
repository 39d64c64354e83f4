"""Issue 6 with drift correction, real processes: a drift-corrected job's contribution reports reach the ledger.
Mosquitto + `coordinator serve` (with its SuperLink, so every report is cross-checked with the strategy's round
captures) + 2 enrolled `agent run`s with SuperNodes, a 2-round job run by `midgate coordinator job start
--drift-correction 1.0` (tests/fl_stack.py, as in tests/test_fl_roles_e2e.py). Each ClientApp body names the
gradient and drift-offset hashes of its round, and so does the report its agent signs; the coordinator logs and
receipts every one, and every ledger report names exactly the update, gradient and offset the strategy captured from
that node."""

from __future__ import annotations

import pytest
from fl_stack import (
    checked_ledger_reports,
    finished_job,
    flags,
    job_nonces,
    job_run_dir,
    start_federated_coordinator,
    start_job,
    start_plaid_agents,
    stopping_federation,
)
from mqtt_fixtures import MessagingStack, wait_until

from coordinator.capture.directory import CaptureDirectory
from coordinator.federation.job import JobOutcome
from protocol.messages import ContributionReport

pytest_plugins = ["mqtt_fixtures"]

ROUNDS = 2


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_drift_corrected_jobs_reports_name_their_drift_hashes_and_reach_the_ledger(
    messaging_stack: MessagingStack,
) -> None:
    stack = messaging_stack
    start_federated_coordinator(stack)
    agents = start_plaid_agents(stack, 2)

    with stopping_federation(stack, agents) as teardown:
        job = start_job(stack, teardown, "job-drift", ROUNDS, "--drift-correction", "1.0")
        book = finished_job(stack, job, "job-drift")
        assert book.flower_status == "finished:completed"
        assert book.request.drift_correction == 1.0
        nonces = job_nonces(book)
        run_dir = job_run_dir(stack, book)
        outcome = JobOutcome.read(run_dir)
        assert outcome.status == "finished" and outcome.rounds_completed == ROUNDS and outcome.drops == []

        # Every round's report of every node is in the ledger and receipted back to its agent; the agents refused no
        # body.
        wait_until(
            lambda: all(h.outbox_counts()[0] == 0 and h.outbox_counts()[1] >= ROUNDS for h, _ in agents),
            120,
            "every report receipted",
        )
        for handle, _ in agents:
            assert not list((handle.spool / "rejected").glob("*.json")), f"{handle.name} refused a body"
        captures = CaptureDirectory(run_dir)
        by_node = {r.flower_node_id: r for _, r in agents}
        reports = checked_ledger_reports(stack, captures, nonces)  # update, gradient and offset hashes as captured
        for logged, update in reports:
            assert logged.payload_type == ContributionReport.PAYLOAD_TYPE
            report = logged.report
            assert report.gradient_sha256 is not None and report.drift_offset_sha256 is not None
            assert report.round_nonce == nonces[report.node_id]
            capture = captures.load_round(report.round)
            assert all(u.gradient_sha256 is not None for u in capture.updates)  # the round was drift-corrected
            assert (update.gradient_sha256, update.drift_offset_sha256) == (
                report.gradient_sha256,
                report.drift_offset_sha256,
            )
        assert {(r.report.node_id, r.report.round) for r, _ in reports} == {
            (n, r) for n in by_node for r in range(1, ROUNDS + 1)
        }
        assert flags(stack.config) == []
