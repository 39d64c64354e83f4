"""FedAvg weights: with attribution on, the model is aggregated with the fixed weights attribution values with,
never with the nodes' self-reported example counts."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from strategy_fakes import WEIGHT_KEY, AnsweringGrid, HandedReplies, RecordingSink, arrays_reply, reply, stamp

from coordinator.attribution.valuation import _player_weights
from coordinator.federation.strategy.participation import Participation
from coordinator.federation.strategy.update_capture import UpdateCapture
from coordinator.federation.strategy.weights import AggregationWeighting, RoundWeights, aggregation_weights

REPORTED = {11: 50, 12: 1_000_000, 13: 200}  # node 12 claims a million examples


def _normalised(weights: dict[int, int]) -> list[float]:
    total = sum(weights.values())
    return [weights[n] / total for n in sorted(weights)]


def test_reported_counts_are_capped_without_attribution() -> None:
    weights = aggregation_weights(REPORTED, AggregationWeighting.REPORTED_CAPPED, max_weight=500)
    assert weights == {11: 50, 12: 500, 13: 200}


def test_fixed_weights_ignore_what_nodes_report() -> None:
    weights = aggregation_weights(REPORTED, AggregationWeighting.FIXED, max_weight=500)
    assert weights == {11: 1, 12: 1, 13: 1}
    inflated = aggregation_weights({**REPORTED, 11: 10**9}, AggregationWeighting.FIXED, max_weight=500)
    assert inflated == weights


def test_fixed_weights_use_verified_counts_capped_as_valuation_does() -> None:
    verified = {11: 40, 12: 900, 13: 100}
    weights = aggregation_weights(
        REPORTED, AggregationWeighting.FIXED, max_weight=500, verified=verified, example_count_cap=300
    )
    assert weights == {11: 40, 12: 300, 13: 100}
    valuation = _player_weights([(0,), (1,), (2,)], [40, 900, 100], 300)
    assert _normalised(weights) == pytest.approx(valuation)


def test_fixed_weights_fall_back_to_equal_when_any_count_is_unverified() -> None:
    verified = {11: 40, 12: None, 13: 100}
    weights = aggregation_weights(
        REPORTED, AggregationWeighting.FIXED, max_weight=500, verified=verified, example_count_cap=300
    )
    assert weights == {11: 1, 12: 1, 13: 1}
    assert _normalised(weights) == pytest.approx(_player_weights([(0,), (1,), (2,)], [40, None, 100], 300))


@pytest.mark.usefixtures("in_a_task")
@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (RoundWeights(AggregationWeighting.REPORTED_CAPPED, max_weight=500), {11: 50, 12: 500, 13: 200}),
        (RoundWeights(AggregationWeighting.UNIFORM, max_weight=500), {11: 1, 12: 1, 13: 1}),
        (RoundWeights(AggregationWeighting.FIXED, max_weight=500), {11: 1, 12: 1, 13: 1}),
        (
            RoundWeights(
                AggregationWeighting.FIXED,
                max_weight=500,
                verified_examples=lambda rnd, node: {11: 7, 12: 9_999, 13: 3}[node],
                example_count_cap=8,
            ),
            {11: 7, 12: 8, 13: 3},
        ),
    ],
)
def test_a_round_is_captured_and_aggregated_with_the_jobs_rule(rule: RoundWeights, expected: dict[int, int]) -> None:
    sink, inner = RecordingSink(), HandedReplies()
    strategy = UpdateCapture(inner, sink, Participation(REPORTED, 1), rule, weighted_by_key=WEIGHT_KEY)
    model = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    sent = stamp(strategy.configure_train(1, model, ConfigRecord(), AnsweringGrid(REPORTED)))  # type: ignore[arg-type]
    strategy.aggregate_train(
        1, [reply(m, arrays_reply({"w": np.ones(2, np.float32)}, REPORTED[m.metadata.dst_node_id])) for m in sent]
    )
    assert {u.node_id: u.weight for u in sink.captures[0].updates} == expected
    handed = {m.metadata.src_node_id: m.content.metric_records["metrics"][WEIGHT_KEY] for m in inner.handed}
    assert handed == expected  # FedAvg weighs by what attribution recorded, never by the nodes' own claims
