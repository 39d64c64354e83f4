"""FedAvg sums the round's float32 updates in the order of the list it is handed. The job strategy's UpdateCapture
hands them over in node-id order, so the global model follows from the recorded updates alone, whatever order the
replies arrived in (docs/federated.md, "Accuracy": in arrival order the same updates gave a different model each
run)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from strategy_fakes import WEIGHT_KEY, AnsweringGrid, RecordingSink, stamp

from coordinator.federation.strategy.participation import Participation
from coordinator.federation.strategy.update_capture import UpdateCapture
from coordinator.federation.strategy.weights import AggregationWeighting, RoundWeights

NODES = {11: 50, 12: 143, 13: 7}  # node id -> examples


def _updates() -> dict[int, np.ndarray]:
    """Updates of very different magnitudes, so that their float32 sum depends on the order it is taken in."""
    rng = np.random.default_rng(0)
    return {node: (rng.standard_normal(4096) * 10.0 ** (2 - i)).astype(np.float32) for i, node in enumerate(NODES)}


def _aggregate(arrival: list[int]) -> np.ndarray:
    strategy = UpdateCapture(
        FedAvg(),
        RecordingSink(),
        Participation(NODES, len(NODES)),
        RoundWeights(AggregationWeighting.REPORTED_CAPPED, max_weight=10**6),
        weighted_by_key=WEIGHT_KEY,
    )
    global_model = ArrayRecord({"w": Array(np.zeros(4096, dtype=np.float32))})
    messages = strategy.configure_train(1, global_model, ConfigRecord(), AnsweringGrid(NODES))  # type: ignore[arg-type]
    sent = {m.metadata.dst_node_id: m for m in stamp(messages)}
    updates = _updates()
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(updates[node])}),
                    "metrics": MetricRecord({WEIGHT_KEY: NODES[node]}),
                }
            ),
            reply_to=sent[node],
        )
        for node in arrival
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return arrays["w"].numpy()


def _float32_fedavg(order: list[int]) -> np.ndarray:
    """Flower's own FedAvg sum for the updates taken in `order`."""
    updates = _updates()
    records = [
        RecordDict({"arrays": ArrayRecord({"w": Array(updates[n])}), "metrics": MetricRecord({WEIGHT_KEY: NODES[n]})})
        for n in order
    ]
    return aggregate_arrayrecords(records, WEIGHT_KEY)["w"].numpy()


@pytest.mark.usefixtures("in_a_task")
def test_the_global_model_does_not_depend_on_the_order_replies_arrive_in() -> None:
    by_node, reversed_arrival = sorted(NODES), sorted(NODES, reverse=True)
    # The premise: summed in arrival order, these updates give two different models.
    assert not np.array_equal(_float32_fedavg(by_node), _float32_fedavg(reversed_arrival))

    for arrival in (by_node, reversed_arrival, [12, 11, 13]):
        assert np.array_equal(_aggregate(arrival), _float32_fedavg(by_node)), arrival
