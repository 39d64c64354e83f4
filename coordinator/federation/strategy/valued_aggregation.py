"""Aggregation by attribution's verdict: an update a screen excluded never moves the global model, and the model
members are paid for is the model that was valued (docs/attribution.md, issue 17)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.federation.strategy.wrapper import StrategyWrapper

WEIGHT_SCALE = 1_000_000
"""Valuation weights (fractions of 1) go to the wrapped strategy as integers in millionths, as counts go."""


class RoundVerdict(Protocol):
    """What attribution decided about a round's updates (coordinator.attribution.round_sink.AttributionSink)."""

    def excluded_nodes(self, server_round: int) -> frozenset[int]: ...
    def member_weights(self, server_round: int) -> dict[int, float]: ...
    def clip_factors(self, server_round: int) -> dict[int, float]: ...
    def combine_factors(self, server_round: int) -> dict[int, float]: ...


class ValuedAggregation(StrategyWrapper):
    """Hands the wrapped strategy each round's updates as attribution judged them, after the sink valued the round
    (UpdateCapture calls the sink before aggregating).

    - `reweigh` True (jobs weighted FIXED): excluded updates are left out and every other update weighs what the
      valuation gave it (a near-duplicate or same-data group weighs as one member, split by its shares), so a copy
      cannot double its data's weight. Robust aggregators (FedMedian, Krum, ...) ignore the weights but still never
      see an excluded update.
    - `reweigh` False (DP jobs: Flower's DP wrapper requires equal weights and, with its accountant, every sampled
      reply): an excluded update is replaced by the global model itself, an update of zero, so the reply count and
      the clipping bound hold and the update moves nothing.

    In both, an update the valuation clipped (a norm outlier) is handed on clipped: the global model plus its update
    times the factor, what was valued. With `reweigh`, one member's devices are handed on scaled too (their combine
    factors): weighed by their shares, they add up to the sum the member was valued at. Under DP they are not: a
    reply scaled up would leave the clipping bound the accountant relies on. A round the sink did not value (its
    verdict is empty) is aggregated as delivered.
    """

    def __init__(self, strategy: Strategy, verdict: RoundVerdict, *, weighted_by_key: str, reweigh: bool) -> None:
        super().__init__(strategy)
        self.verdict = verdict
        self.weighted_by_key = weighted_by_key
        self.reweigh = reweigh
        self._global = ArrayRecord()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        excluded = self.verdict.excluded_nodes(server_round)
        weights = self.verdict.member_weights(server_round)
        if not weights:
            return self.strategy.aggregate_train(server_round, replies)
        clipped = self.verdict.clip_factors(server_round)
        combined = self.verdict.combine_factors(server_round) if self.reweigh else {}
        kept = []
        for reply in replies:
            node = reply.metadata.src_node_id
            factor = clipped.get(node, 1.0) * combined.get(node, 1.0)
            if factor != 1.0 and node not in excluded:
                self._scale_update(reply, factor)
            if not self.reweigh:
                if node in excluded:
                    self._scale_update(reply, 0.0)
                kept.append(reply)
                continue
            weight = round(weights.get(node, 0.0) * WEIGHT_SCALE)
            if node in excluded or weight <= 0:
                continue
            next(iter(reply.content.metric_records.values()))[self.weighted_by_key] = weight
            kept.append(reply)
        if not kept:
            return None, None  # Flower keeps the global model: no admitted update this round
        return self.strategy.aggregate_train(server_round, kept)

    def _scale_update(self, reply: Message, factor: float) -> None:
        """Replace the reply's model by the global model plus `factor` times its update (0: the global model)."""
        key = next(iter(reply.content.array_records))
        sent = reply.content.array_records[key]
        scaled = {}
        for name, start in self._global.items():
            base = start.numpy()
            update = sent[name].numpy() - base if factor else 0
            scaled[name] = Array(np.asarray(base + factor * update, dtype=base.dtype))
        reply.content[key] = ArrayRecord(scaled)
