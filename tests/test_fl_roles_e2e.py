"""End to end through midgate's roles: Mosquitto + `coordinator serve` (with its SuperLink) + 3 enrolled
`agent run`s on PLAID replay windows. `midgate coordinator job start` invites the devices (signed RoundInvitation on
down/invite), each agent starts its SuperNode, the command runs a 2-round job on the SuperLink, and every round's
contribution record goes ClientApp -> spool -> agent outbox (signed) -> MQTT -> coordinator ledger -> receipt verified
by the agent; each ledger report names exactly the update the strategy received from that node (check_contribution).

It runs twice: with Flower acceleration (the default: coordinator.federation.acceleration, edge.federated.acceleration)
and with `flower_acceleration = false` in the coordinator's and the agents' config, Flower as shipped, so that a Flower
upgrade can drop the acceleration knowing the job's outcome does not depend on it."""

from __future__ import annotations

import json

import pytest
from fl_stack import (
    checked_ledger_reports,
    finished_job,
    job_nonces,
    job_run_dir,
    midgate,
    start_federated_coordinator,
    start_job,
    start_plaid_agents,
    stopping_federation,
)
from mqtt_fixtures import MessagingStack, wait_until

from coordinator.capture.directory import CaptureDirectory
from coordinator.federation.job import JobOutcome
from runtime.fork_server import READY_LINE

pytest_plugins = ["mqtt_fixtures"]


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.parametrize("accelerated", [True, False], ids=["flower-acceleration", "flower-as-shipped"])
def test_two_round_job_reports_reach_the_ledger_and_match_the_strategys_updates(
    messaging_stack: MessagingStack, accelerated: bool
) -> None:
    stack = messaging_stack
    switch = f"flower_acceleration = {str(accelerated).lower()}"
    start_federated_coordinator(stack, switch)
    agents = start_plaid_agents(stack, 3, extra=switch)
    warm_log = stack.data_dir / "federation" / "warm-serverapp" / "warm.log"
    if accelerated:  # the job's ServerApp is to be forked from serve's warm parent: wait for its imports
        wait_until(lambda: warm_log.exists() and READY_LINE in warm_log.read_text(), 120, "warm serverapp ready")

    with stopping_federation(stack, agents) as teardown:
        # The MID operator's command: it invites every enrolled device with a Flower node ("all online": no
        # --device), runs the job on serve's SuperLink (its first round waits for their SuperNodes to join),
        # re-invites while it runs, and exits 0 only when the run finished:completed with every round in the
        # ServerApp's outcome.
        job = start_job(stack, teardown, "job-1", 2)
        book = finished_job(stack, job, "job-1", timeout_s=360)
        assert (book.status, book.flower_status) == ("completed", "finished:completed")
        assert sorted(book.selected_node_ids) == sorted(r.flower_node_id for _, r in agents)
        nonces = job_nonces(book)
        run_dir = job_run_dir(stack, book)
        outcome = JobOutcome.read(run_dir)
        assert outcome.status == "finished" and outcome.rounds_completed == 2 and outcome.drops == []
        assert book.outcome == outcome
        listed = midgate("coordinator", "job", "list", "--config", str(stack.config))
        assert listed.splitlines()[0].split("\t")[:3] == ["job", "status", "task"]
        assert listed.splitlines()[1].startswith("job-1\tcompleted\tplaid-appliance@1\t2/2\t")

        # Every round's report of every node is in the ledger and receipted back to its agent.
        wait_until(
            lambda: all(h.outbox_counts()[0] == 0 and h.outbox_counts()[1] >= 2 for h, _ in agents),
            120,
            "every report receipted",
        )
        captures = CaptureDirectory(run_dir)
        by_node = {r.flower_node_id: r for _, r in agents}
        reports = checked_ledger_reports(stack, captures, nonces)
        assert {(r.report.node_id, r.report.round) for r, _ in reports} == {(n, r) for n in by_node for r in (1, 2)}

        # The switch reached every piece, and nothing else differed: the ServerApp ran on the accelerated grid or on
        # Flower's (its outcome says which); the fleet front held the devices' empty pulls or only passed them on; each
        # agent ran its job's SuperNode through a warm executor or as Flower starts it.
        assert outcome.flower_acceleration is accelerated
        stats_file = stack.data_dir / "federation" / "fleet-front.json"
        wait_until(lambda: stats_file.exists() and "forwarded" in json.loads(stats_file.read_text()), 30, "front stats")
        assert ("pulls_held" in json.loads(stats_file.read_text())) is accelerated
        for handle, _ in agents:
            assert (handle.data_dir / "mids" / handle.mid / "warm.log").exists() is accelerated  # kept between jobs
        # ... and the ServerApp was forked from serve's warm parent (keep_warm_serverapp, on by default), not started
        # fresh as the launcher does when it cannot reach it; or, with the switch off, Flower's own process.
        superlink_log = (stack.data_dir / "federation" / "superlink" / "superlink.log").read_text()
        assert "midgate fork server for flwr-serverapp" not in superlink_log  # no fallback, no lost parent
        assert ("forked flwr-serverapp as pid" in warm_log.read_text()) if accelerated else not warm_log.exists()
