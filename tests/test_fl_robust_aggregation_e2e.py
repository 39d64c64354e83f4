"""A buyer's robust aggregation reaches the model, on real processes: Mosquitto + `coordinator serve` + 3 enrolled
`agent run`s replaying PLAID; `midgate coordinator job start --aggregation fedmedian` runs a 2-round job and the
job's final model is the coordinate-wise median of the last round's admitted updates as the strategy captured them
(FedAvg's mean would not be), while every round is still valued and logged (docs/attribution.md, "Robust
aggregation")."""

from __future__ import annotations

import numpy as np
import pytest
from fl_stack import (
    finished_job,
    job_run_dir,
    start_federated_coordinator,
    start_job,
    start_plaid_agents,
    stopping_federation,
)
from mqtt_fixtures import MessagingStack

from coordinator.capture.directory import CaptureDirectory
from coordinator.federation.job import Aggregation
from coordinator.ledger.store import LedgerReader
from protocol.job_log import RoundLogRecord, decode_round_record
from protocol.leaves import LeafKind, decode_leaf

pytest_plugins = ["mqtt_fixtures"]

JOB = "job-median"
ROUNDS = 2


def _round_records(stack: MessagingStack) -> list[RoundLogRecord]:
    with LedgerReader.open_existing(stack.data_dir / "ledger.sqlite") as reader:
        leaves = [decode_leaf(data) for _, data in reader.leaves(0, reader.size)]
    return [decode_round_record(leaf.signed) for leaf in leaves if leaf.kind is LeafKind.ROUND]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_fedmedian_job_started_by_the_operator_aggregates_by_the_median_and_is_still_valued(
    messaging_stack: MessagingStack,
) -> None:
    stack = messaging_stack
    start_federated_coordinator(stack, "")
    agents = start_plaid_agents(stack, 3)

    with stopping_federation(stack, agents) as teardown:
        # --tail-average 1: the final model is the last round's global model itself, not a mean of several.
        job = start_job(stack, teardown, JOB, ROUNDS, "--aggregation", "fedmedian", "--tail-average", "1")
        book = finished_job(stack, job, JOB, timeout_s=420)
        assert book.request.aggregation is Aggregation.FEDMEDIAN and book.request.server_momentum == 0.0
        run_dir = job_run_dir(stack, book)

        rounds = _round_records(stack)
        assert [r.round for r in rounds] == [1, 2]
        assert all(u.value_units is not None for r in rounds for u in r.updates)
        admitted = {u.node_id for u in rounds[-1].updates if not u.excluded}
        assert len(admitted) >= 2
        last = [u for u in CaptureDirectory(run_dir).load_round(ROUNDS).updates if u.node_id in admitted]
        with np.load(run_dir / "final-model.npz", allow_pickle=False) as final:
            for name in final.files:
                replies = np.stack([u.arrays[name].astype(np.float64) for u in last])
                median, mean = np.median(replies, axis=0), replies.mean(axis=0)
                assert np.allclose(final[name], median, rtol=0, atol=1e-6), name
                if not np.allclose(median, mean, rtol=0, atol=1e-5):
                    assert not np.allclose(final[name], mean, rtol=0, atol=1e-6), name
