"""What a node's update weighs in FedAvg (and in the drift correction's mean gradient)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class AggregationWeighting(StrEnum):
    """What a node's update weighs in FedAvg."""

    REPORTED_CAPPED = "reported-capped"
    """The node's self-reported example count, capped at `max_weight` (plain FedAvg; jobs without attribution)."""
    UNIFORM = "uniform"
    """Every node 1 (Flower's DP accountant requires equal weights)."""
    FIXED = "fixed"
    """The weights attribution values with (coordinator.attribution.valuation): coordinator-verified example counts
    capped at `example_count_cap` when every node of the round has one, otherwise every node 1. The model members
    are paid for is then the model that was valued, and a node cannot buy weight by over-reporting its count."""


def aggregation_weights(
    reported: Mapping[int, int],
    weighting: AggregationWeighting,
    *,
    max_weight: int,
    verified: Mapping[int, int | None] | None = None,
    example_count_cap: int | None = None,
) -> dict[int, int]:
    """Node id -> integer FedAvg weight for one round's accepted updates (FedAvg normalises by the sum).

    `reported` are the nodes' own `num-examples` claims; only REPORTED_CAPPED reads them.
    """
    if weighting is AggregationWeighting.REPORTED_CAPPED:
        return {node: min(count, max_weight) for node, count in reported.items()}
    if weighting is AggregationWeighting.FIXED and example_count_cap is not None and verified is not None:
        counts = {node: verified.get(node) for node in reported}
        if all(count is not None for count in counts.values()):
            capped = {node: min(max(int(count or 0), 0), example_count_cap) for node, count in counts.items()}
            if sum(capped.values()) > 0:
                return capped
    return {node: 1 for node in reported}


@dataclass(frozen=True)
class RoundWeights:
    """A job's weighting rule, applied round by round.

    Parameters
    ----------
    weighting:
        How updates are weighted. Jobs with attribution use FIXED, so pay never depends on self-reported counts; DP
        jobs UNIFORM; the others REPORTED_CAPPED.
    max_weight:
        Cap on the self-reported example count (REPORTED_CAPPED; design: never trust it uncapped).
    verified_examples:
        (round, node id) -> the example count the coordinator verified itself, or None (FIXED only; default None).
    example_count_cap:
        Cap on verified counts (FIXED only; ValuationSettings.example_count_cap); None weighs every node 1.
    """

    weighting: AggregationWeighting
    max_weight: int
    verified_examples: Callable[[int, int], int | None] | None = None
    example_count_cap: int | None = None

    def __call__(self, server_round: int, reported: Mapping[int, int]) -> dict[int, int]:
        """The round's weights for the nodes in `reported` (node id -> self-reported example count)."""
        verified = None
        if self.verified_examples is not None:
            verified = {node: self.verified_examples(server_round, node) for node in reported}
        return aggregation_weights(
            reported,
            self.weighting,
            max_weight=self.max_weight,
            verified=verified,
            example_count_cap=self.example_count_cap,
        )
