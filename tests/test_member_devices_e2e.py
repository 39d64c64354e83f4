"""One member's devices are one player of a job, on real processes: Mosquitto + `coordinator serve` + 4 enrolled
`agent run`s replaying PLAID, the fourth enrolled with a second invite of the first device's member (its second
device, holding other recordings). `midgate coordinator job start` tells the ServerApp which nodes are one member's,
every ROUND leaf shows the two as one player flagged `same_member` with the player's value split between them (in
halves, or by their shares where the screens found them alike by their data too), the
JOB leaf pays the member their sum, and `midgate ledger recompute-job` reproduces the JOB leaf from the ROUND leaves
(docs/attribution.md, section 3)."""

from __future__ import annotations

import pytest
from fl_stack import (
    finished_job,
    midgate,
    start_federated_coordinator,
    start_job,
    start_plaid_agents,
    stopping_federation,
)
from mqtt_fixtures import MessagingStack

from coordinator.ledger.store import LedgerReader
from protocol.job_log import JobLogRecord, RoundLogRecord, decode_job_record, decode_round_record
from protocol.leaves import LeafKind, decode_leaf

pytest_plugins = ["mqtt_fixtures"]

JOB = "job-devices"
ROUNDS = 2


def _logged(stack: MessagingStack) -> tuple[JobLogRecord, list[RoundLogRecord]]:
    with LedgerReader.open_existing(stack.data_dir / "ledger.sqlite") as reader:
        leaves = [decode_leaf(data) for _, data in reader.leaves(0, reader.size)]
    [job] = [decode_job_record(leaf.signed) for leaf in leaves if leaf.kind is LeafKind.JOB]
    return job, [decode_round_record(leaf.signed) for leaf in leaves if leaf.kind is LeafKind.ROUND]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_members_two_devices_are_valued_as_one_player_and_paid_their_sum(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    start_federated_coordinator(stack, "")
    agents = start_plaid_agents(stack, 4, members={"m3": "m0"})

    with stopping_federation(stack, agents) as teardown:
        job = start_job(stack, teardown, JOB, ROUNDS, "--tail-average", "1")
        book = finished_job(stack, job, JOB, timeout_s=420)
        member_of = {d.node_id: d.member_id for d in book.invited}
        alice = sorted(node for node, member in member_of.items() if member == "m0")
        assert len(alice) == 2 and len(member_of) == 4

        logged, rounds = _logged(stack)
        assert [r.round for r in rounds] == [1, 2]
        for record in rounds:
            updates = {u.node_id: u for u in record.updates}
            admitted = [node for node in alice if node in updates and not updates[node].excluded]
            if len(admitted) < 2:
                continue  # one of the member's devices missed or was screened out of this round: nothing to join
            [player] = [group for group in record.groups if alice[0] in group]
            assert set(alice) <= set(player), record.groups
            assert all("same_member" in updates[node].screens for node in alice), record.updates
            if not any("same_data" in updates[node].screens for node in alice):
                assert updates[alice[0]].value_units == updates[alice[1]].value_units  # the player's value, halved
            others = [node for node in updates if node not in alice]
            assert all("same_member" not in updates[node].screens for node in others)
        assert any(alice[0] in group for record in rounds for group in record.groups), "never one player"

        # The JOB leaf pays the member the sum of its devices, and a ledger holder recomputes it from the ROUNDs.
        values = {m.member: m.value_units for m in logged.attribution}
        assert set(values) == {"m0", "m1", "m2"}
        totals = [sum(u.value_units or 0 for u in r.updates if u.node_id in alice) for r in rounds]
        assert values["m0"] == sum(totals)
        recomputed = midgate("ledger", "recompute-job", JOB, "--db", str(stack.data_dir / "ledger.sqlite"))
        assert recomputed == "ok\n", recomputed
