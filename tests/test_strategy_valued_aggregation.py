"""ValuedAggregation: the job's strategy aggregates attribution's verdict. An excluded update never moves the model
(left out under FIXED weights, replaced by the global model under DP), a group weighs as its valuation weights say,
a robust strategy never sees an excluded update, an update the valuation clipped is aggregated clipped, and a round
the sink did not value is aggregated as delivered. One member's devices add up as they were valued (not under
DP)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian
from strategy_fakes import WEIGHT_KEY, AnsweringGrid, HandedReplies, arrays_reply, reply, stamp

from coordinator.federation.strategy.valued_aggregation import WEIGHT_SCALE, ValuedAggregation

pytestmark = pytest.mark.usefixtures("in_a_task")

GLOBAL = {"w": np.zeros(3, dtype=np.float32)}


class Verdict:
    def __init__(
        self,
        excluded: set[int],
        weights: dict[int, float],
        clipped: dict[int, float] | None = None,
        combined: dict[int, float] | None = None,
    ) -> None:
        self.excluded, self.weights, self.clipped = frozenset(excluded), weights, clipped or {}
        self.combined = combined or {}

    def excluded_nodes(self, server_round: int) -> frozenset[int]:
        return self.excluded

    def member_weights(self, server_round: int) -> dict[int, float]:
        return self.weights

    def clip_factors(self, server_round: int) -> dict[int, float]:
        return self.clipped

    def combine_factors(self, server_round: int) -> dict[int, float]:
        return self.combined


def _replies(values: dict[int, float]) -> list[Message]:
    sent = stamp([Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN) for node in values])
    return [
        reply(message, arrays_reply({"w": np.full(3, v, dtype=np.float32)}, 1))
        for message, v in zip(sent, values.values(), strict=True)
    ]


def _started(strategy: ValuedAggregation) -> ValuedAggregation:
    """The strategy after round 1's configure_train: it keeps the global model it was handed."""
    list(
        strategy.configure_train(
            1, ArrayRecord({n: Array(a) for n, a in GLOBAL.items()}), ConfigRecord(), AnsweringGrid([11, 12, 13])
        )
    )  # type: ignore[arg-type]
    return strategy


def test_fixed_weights_leave_excluded_updates_out_and_weigh_the_rest_as_valued() -> None:
    inner = HandedReplies()
    verdict = Verdict({13}, {11: 0.75, 12: 0.25, 13: 0.0})
    strategy = ValuedAggregation(inner, verdict, weighted_by_key=WEIGHT_KEY, reweigh=True)
    arrays, _ = strategy.aggregate_train(1, _replies({11: 1.0, 12: 5.0, 13: 1000.0}))
    assert [m.metadata.src_node_id for m in inner.handed] == [11, 12]
    assert [m.content.metric_records["metrics"][WEIGHT_KEY] for m in inner.handed] == [
        0.75 * WEIGHT_SCALE,
        0.25 * WEIGHT_SCALE,
    ]
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 0.75 * 1.0 + 0.25 * 5.0)


def test_under_dp_an_excluded_update_is_the_global_model_so_the_reply_count_holds() -> None:
    inner = HandedReplies()
    strategy = _started(
        ValuedAggregation(inner, Verdict({13}, {11: 0.5, 12: 0.5}), weighted_by_key=WEIGHT_KEY, reweigh=False)
    )
    arrays, _ = strategy.aggregate_train(1, _replies({11: 3.0, 12: 3.0, 13: 1000.0}))
    assert [m.metadata.src_node_id for m in inner.handed] == [11, 12, 13]
    assert np.allclose(inner.handed[2].content.array_records["arrays"]["w"].numpy(), 0.0)
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 2.0)  # (3 + 3 + 0) / 3: the outlier moved nothing


@pytest.mark.parametrize("reweigh", [True, False], ids=["fixed-weights", "dp"])
def test_a_clipped_update_is_aggregated_at_the_length_it_was_valued_at(reweigh: bool) -> None:
    inner = HandedReplies()
    verdict = Verdict(set(), {11: 0.5, 12: 0.5}, clipped={12: 0.25})
    strategy = _started(ValuedAggregation(inner, verdict, weighted_by_key=WEIGHT_KEY, reweigh=reweigh))
    arrays, _ = strategy.aggregate_train(1, _replies({11: 1.0, 12: 20.0}))
    assert np.allclose(inner.handed[1].content.array_records["arrays"]["w"].numpy(), 5.0)  # 0 + 0.25 × 20
    assert inner.handed[1].content.array_records["arrays"]["w"].numpy().dtype == np.float32
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 3.0)  # (1 + 5) / 2, where unclipped: 10.5


def test_one_members_devices_are_aggregated_as_the_sum_they_were_valued_at_but_not_scaled_up_under_dp() -> None:
    # Nodes 12 and 13 are one member's: one player of weight 0.5, shares 1/2 each, valued as 0.8 × (their sum):
    # combine factor 0.8 × 2 = 1.6 each (screens: `owners`).
    verdict = Verdict(set(), {11: 0.5, 12: 0.25, 13: 0.25}, clipped={13: 0.5}, combined={12: 1.6, 13: 1.6})
    inner = HandedReplies()
    strategy = _started(ValuedAggregation(inner, verdict, weighted_by_key=WEIGHT_KEY, reweigh=True))
    arrays, _ = strategy.aggregate_train(1, _replies({11: 1.0, 12: 2.0, 13: 4.0}))
    assert np.allclose(inner.handed[1].content.array_records["arrays"]["w"].numpy(), 3.2)  # 1.6 × 2
    assert np.allclose(inner.handed[2].content.array_records["arrays"]["w"].numpy(), 3.2)  # 0.5 × 1.6 × 4
    # The member's player: 0.8 × (2 + 0.5 × 4) = 3.2 at weight 0.5; the other member 1 at 0.5.
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 0.5 * 1.0 + 0.5 * 3.2)
    under_dp = HandedReplies()
    strategy = _started(ValuedAggregation(under_dp, verdict, weighted_by_key=WEIGHT_KEY, reweigh=False))
    strategy.aggregate_train(1, _replies({11: 1.0, 12: 2.0, 13: 4.0}))
    assert [m.content.array_records["arrays"]["w"].numpy()[0] for m in under_dp.handed] == [1.0, 2.0, 2.0]


def test_a_robust_strategy_never_sees_an_excluded_update() -> None:
    median = FedMedian(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    verdict = Verdict({13, 14}, {11: 1 / 3, 12: 1 / 3, 15: 1 / 3})
    strategy = ValuedAggregation(median, verdict, weighted_by_key=WEIGHT_KEY, reweigh=True)
    # With the two excluded 1000s the median would be 1000; without them it is the median of 1, 2, 4.
    arrays, _ = strategy.aggregate_train(1, _replies({11: 1.0, 12: 2.0, 13: 1000.0, 14: 1000.0, 15: 4.0}))
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 2.0)


def test_a_round_without_admitted_updates_keeps_the_global_model_and_an_unvalued_round_is_aggregated_as_is() -> None:
    fedavg = FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    nobody = ValuedAggregation(fedavg, Verdict({11, 12}, {11: 0.5, 12: 0.5}), weighted_by_key=WEIGHT_KEY, reweigh=True)
    assert nobody.aggregate_train(1, _replies({11: 1.0, 12: 2.0})) == (None, None)
    unvalued = ValuedAggregation(fedavg, Verdict(set(), {}), weighted_by_key=WEIGHT_KEY, reweigh=True)
    arrays, _ = unvalued.aggregate_train(1, _replies({11: 1.0, 12: 3.0}))
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 2.0)
