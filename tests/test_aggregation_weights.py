"""FedAvg weights: with attribution on, the model is aggregated with the fixed weights attribution values with,
never with the nodes' self-reported example counts."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from coordinator.attribution.valuation import _player_weights
from coordinator.capture.round import CapturedUpdate, RoundCapture
from coordinator.federation.strategy import AggregationWeighting, JobStrategy, aggregation_weights

REPORTED = {11: 50, 12: 1_000_000, 13: 200}  # node 12 claims a million examples


class _Sink:
    def on_round(self, capture: RoundCapture) -> None:
        pass


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


def _update(node: int, reported: int) -> CapturedUpdate:
    return CapturedUpdate(1, node, [np.zeros(2, dtype=np.float32)], "a" * 64, "b" * 64, reported, 1, {})


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, {11: 50, 12: 500, 13: 200}),
        ({"uniform_weights": True}, {11: 1, 12: 1, 13: 1}),
        ({"weighting": AggregationWeighting.FIXED}, {11: 1, 12: 1, 13: 1}),
        (
            {
                "weighting": AggregationWeighting.FIXED,
                "verified_examples": lambda rnd, node: {11: 7, 12: 9_999, 13: 3}[node],
                "example_count_cap": 8,
            },
            {11: 7, 12: 8, 13: 3},
        ),
    ],
)
def test_strategy_weighs_a_round_by_its_option(options: dict[str, object], expected: dict[int, int]) -> None:
    strategy = JobStrategy(FedAvg(), REPORTED, 1, _Sink(), max_weight=500, **options)  # type: ignore[arg-type]
    updates = [_update(node, count) for node, count in REPORTED.items()]
    assert strategy._round_weights(1, updates) == expected


def test_uniform_contradicting_fixed_is_refused() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        JobStrategy(
            FedAvg(), REPORTED, 1, _Sink(), max_weight=5, uniform_weights=True, weighting=AggregationWeighting.FIXED
        )
