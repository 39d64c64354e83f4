"""The job strategy: Flower's FedAvg, wrapped so a job samples only its selected nodes, captures every node's
update for attribution, and survives dropouts without hanging.

Wrapping, not forking (as Flower's own DP wrappers do): `JobStrategy` delegates message construction and
aggregation to the inner strategy (FedAvg, or Flower's DifferentialPrivacyClientSideFixedClipping around FedAvg)
and adds only node selection, reply screening, capture, the minimum-participation rule and, when a job asks for
it, the drift correction's gradient query before each round's training (protocol.tasks.drift).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import cast

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.capture.round import CapturedUpdate, DropReason, NDArrays, NodeDrop, RoundCapture, UpdateSink
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.drift import DRIFT_OFFSET_KEY, GRADIENT_KEY, QUERY_GRADIENT, drift_offsets

WEIGHT_KEY = "num-examples"
QUERY_DETAIL = "gradient query"  # the detail of drops in the drift correction's query phase
NODE_UNAVAILABLE_CODE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE


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
class QueriedGradient:
    """A node's answer to a round's gradient query and the offset computed for it (protocol.tasks.drift)."""

    gradient: NDArrays = field(repr=False)
    gradient_sha256: str
    offset: dict[str, npt.NDArray[np.float32]] = field(repr=False)
    offset_sha256: str


class JobFailedError(Exception):
    """The job cannot go on; `reason` is recorded in the job outcome (stable strings)."""

    def __init__(self, reason: str, message: str, **details: object) -> None:
        super().__init__(f"{reason}: {message} {details}")
        self.reason = reason
        self.details = details


class _SelectedNodes:
    """The part of a Grid that FedAvg's sampling reads (`get_node_ids`), restricted to the job's nodes."""

    def __init__(self, grid: Grid, node_ids: frozenset[int]) -> None:
        self._grid = grid
        self._node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n in self._node_ids]


class JobStrategy(Strategy):
    """FedAvg (or a DP wrapper around it) for one buyer's job.

    Parameters
    ----------
    inner:
        The wrapped strategy; its minimum/fraction settings are overridden per round to "all live selected nodes".
    selected_node_ids:
        The SuperLink node ids the coordinator selected for the job; no other node is ever sent a message.
    min_nodes:
        Fewest updates a round may aggregate; below it the job fails with reason `too_few_replies` (or
        `too_few_nodes` when too few selected nodes are connected at the start of a round).
    join_timeout:
        Seconds to wait at the start of a round for selected nodes to connect (default 60).
    sink:
        Receives every round's captured updates and drops before aggregation (the attribution hook).
    max_weight:
        Cap on the self-reported example count used as a node's aggregation weight (design: never trust it uncapped).
    uniform_weights:
        Weight every node 1 (required by Flower's DP accountant); default False. Shorthand for
        `weighting=AggregationWeighting.UNIFORM`.
    weighting:
        How updates are weighted (AggregationWeighting); default REPORTED_CAPPED, or UNIFORM with `uniform_weights`.
        Jobs with attribution use FIXED, so pay never depends on self-reported example counts.
    verified_examples:
        (round, node id) -> the example count the coordinator verified itself, or None (FIXED only).
    example_count_cap:
        Cap on verified counts (FIXED only; ValuationSettings.example_count_cap); None weighs every node 1.
    run_id:
        The Flower run id, recorded in captures.
    federated_evaluate:
        Delegate Flower's federated evaluate round to the inner strategy (default False: the job is evaluated
        centrally on the buyer's validation set, which saves a round trip per round).
    drift_correction:
        Strength in [0, 1] of the drift correction (protocol.tasks.drift); default 0: off. When on, every round first
        sends each live selected node a `query.gradient` message, drops the nodes that do not answer it within
        `query_timeout` (as in the train phase), averages the gradients with the round's aggregation weights and
        sends each remaining node its offset in its train message (ArrayRecord `drift-offset`). Not with DP: the
        gradient would leave the device unclipped and unnoised.
    query_timeout:
        Seconds to wait for the gradient query's replies (default 120).
    """

    def __init__(
        self,
        inner: Strategy,
        selected_node_ids: Iterable[int],
        min_nodes: int,
        sink: UpdateSink,
        *,
        max_weight: int,
        join_timeout: float = 60.0,
        uniform_weights: bool = False,
        weighting: AggregationWeighting | None = None,
        verified_examples: Callable[[int, int], int | None] | None = None,
        example_count_cap: int | None = None,
        run_id: int = 0,
        federated_evaluate: bool = False,
        drift_correction: float = 0.0,
        query_timeout: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner = inner
        self.selected = frozenset(selected_node_ids)
        if not 1 <= min_nodes <= len(self.selected):
            raise ValueError(f"min_nodes must be in 1..{len(self.selected)}, got {min_nodes}")
        self.min_nodes = min_nodes
        self.sink = sink
        self.max_weight = max_weight
        self.join_timeout = join_timeout
        self.uniform_weights = uniform_weights
        if weighting is None:
            weighting = AggregationWeighting.UNIFORM if uniform_weights else AggregationWeighting.REPORTED_CAPPED
        elif uniform_weights and weighting is not AggregationWeighting.UNIFORM:
            raise ValueError("uniform_weights contradicts weighting")
        self.weighting = weighting
        self.verified_examples = verified_examples
        self.example_count_cap = example_count_cap
        self.run_id = run_id
        self.federated_evaluate = federated_evaluate
        if not 0 <= drift_correction <= 1:
            raise ValueError(f"drift_correction must be in [0, 1], got {drift_correction}")
        self.drift_correction = drift_correction
        self.query_timeout = query_timeout
        self._clock = clock
        self._sleep = sleep
        self.dropped: dict[int, NodeDrop] = {}  # nodes that died; not asked again in this job
        self.drops: list[NodeDrop] = []
        self._sent: frozenset[int] = frozenset()
        self._outbox: list[Message] = []
        self._global_sha256 = ""
        self._global_shapes: dict[str, tuple[int, ...]] = {}
        self._query_drops: list[NodeDrop] = []  # this round's gradient-query drops, for the round's capture
        self._gradients: dict[int, QueriedGradient] = {}  # this round's accepted gradients and offsets, by node

    def summary(self) -> None:
        self.inner.summary()

    def _live_selected(self, grid: Grid) -> frozenset[int]:
        wanted = self.selected - set(self.dropped)
        deadline = self._clock() + self.join_timeout
        while True:
            live = wanted & set(grid.get_node_ids())
            if live == wanted or self._clock() >= deadline:
                return live
            self._sleep(0.2)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        live = self._live_selected(grid)
        round_drops = [
            NodeDrop(server_round, n, DropReason.DROPPED_EARLIER, str(self.dropped[n].reason)) for n in self.dropped
        ]
        round_drops += [
            NodeDrop(server_round, n, DropReason.NOT_CONNECTED)
            for n in sorted(self.selected - live - set(self.dropped))
        ]
        self.drops.extend(round_drops)
        if len(live) < self.min_nodes:
            raise JobFailedError(
                "too_few_nodes",
                "too few selected nodes connected",
                round=server_round,
                live=len(live),
                minimum=self.min_nodes,
            )
        numpy_arrays = {name: a.numpy() for name, a in arrays.items()}
        self._global_sha256 = arrays_sha256(numpy_arrays)
        observe_global = getattr(self.sink, "observe_global", None)  # attribution needs the global model itself
        if callable(observe_global):
            observe_global(numpy_arrays)
        self._global_shapes = {name: tuple(a.shape) for name, a in numpy_arrays.items()}
        self._query_drops, self._gradients = [], {}
        if self.drift_correction > 0:
            live = self._query_gradients(server_round, arrays, grid, live)
        self._sent = live
        self._set_inner_sampling(len(live))
        # Kept so replies can be matched to nodes by the message they answer: the grid stamps each message's id on
        # push, and an error the SuperLink generates for a lost node names the SuperLink, not the node, as source.
        self._outbox = list(
            self.inner.configure_train(server_round, arrays, config, cast(Grid, _SelectedNodes(grid, live)))
        )
        if self._gradients:
            self._outbox = [self._with_offset(msg) for msg in self._outbox]
        return self._outbox

    def _query_gradients(
        self, server_round: int, arrays: ArrayRecord, grid: Grid, live: frozenset[int]
    ) -> frozenset[int]:
        """The drift correction's first message: each live node's gradient at the global model. Returns the nodes
        that answered with a usable one (the others are dropped like silent or faulty train replies) and keeps
        their gradients and offsets for the train messages and the round's capture."""
        queries = [
            Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                message_type=f"{MessageType.QUERY}.{QUERY_GRADIENT}",
                dst_node_id=node,
            )
            for node in sorted(live)
        ]
        replies = list(grid.send_and_receive(queries, timeout=self.query_timeout))
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in queries}
        accepted: dict[int, tuple[NDArrays, int]] = {}
        drops: list[NodeDrop] = []
        for msg in replies:
            node = destination.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if node not in live or node in accepted or any(d.node_id == node for d in drops):
                drops.append(NodeDrop(server_round, node, DropReason.UNEXPECTED_NODE, QUERY_DETAIL))
                continue
            outcome = self._screen_gradient(server_round, node, msg)
            if isinstance(outcome, NodeDrop):
                drops.append(outcome)
            else:
                accepted[node] = outcome
        answered = set(accepted) | {d.node_id for d in drops}
        drops += [NodeDrop(server_round, n, DropReason.NO_REPLY, QUERY_DETAIL) for n in sorted(live - answered)]
        for drop in drops:
            if drop.reason in (DropReason.NO_REPLY, DropReason.NODE_UNAVAILABLE):
                self.dropped[drop.node_id] = drop
        self.drops.extend(drops)
        self._query_drops = drops
        if len(accepted) < self.min_nodes:
            raise JobFailedError(
                "too_few_replies",
                "too few usable gradients",
                round=server_round,
                usable=len(accepted),
                minimum=self.min_nodes,
            )
        weights = self._weights_for(server_round, {node: examples for node, (_, examples) in accepted.items()})
        offsets = drift_offsets({n: g for n, (g, _) in accepted.items()}, weights, self.drift_correction)
        self._gradients = {
            node: QueriedGradient(gradient, arrays_sha256(gradient), offsets[node], arrays_sha256(offsets[node]))
            for node, (gradient, _) in accepted.items()
        }
        return frozenset(accepted)

    def _screen_gradient(self, server_round: int, node: int, msg: Message) -> tuple[NDArrays, int] | NodeDrop:
        """A query reply must carry one gradient shaped like the global model, finite, and a positive count."""
        if msg.has_error():
            code = msg.error.code
            reason = DropReason.NODE_UNAVAILABLE if code == NODE_UNAVAILABLE_CODE else DropReason.ERROR_REPLY
            return NodeDrop(server_round, node, reason, f"{QUERY_DETAIL}: code {code}: {str(msg.error.reason)[:200]}")
        records, metrics = msg.content.array_records, msg.content.metric_records
        if set(records) != {GRADIENT_KEY} or len(metrics) != 1:
            return NodeDrop(
                server_round,
                node,
                DropReason.MALFORMED_REPLY,
                f"{QUERY_DETAIL}: need one gradient and one MetricRecord",
            )
        reported = next(iter(metrics.values())).get(WEIGHT_KEY)
        if not isinstance(reported, int) or isinstance(reported, bool) or reported <= 0:
            return NodeDrop(
                server_round, node, DropReason.MALFORMED_REPLY, f"{QUERY_DETAIL}: {WEIGHT_KEY} must be a positive int"
            )
        try:
            gradient = {name: a.numpy() for name, a in records[GRADIENT_KEY].items()}
        except Exception as err:  # Flower raises several types for undecodable arrays; all mean the same here
            return NodeDrop(
                server_round,
                node,
                DropReason.MALFORMED_REPLY,
                f"{QUERY_DETAIL}: undecodable arrays: {type(err).__name__}",
            )
        shapes = {name: tuple(a.shape) for name, a in gradient.items()}
        if shapes != self._global_shapes or not all(
            a.dtype.kind == "f" and np.isfinite(a).all() for a in gradient.values()
        ):
            return NodeDrop(
                server_round, node, DropReason.MALFORMED_REPLY, f"{QUERY_DETAIL}: arrays differ from the global model's"
            )
        return gradient, reported

    def _with_offset(self, msg: Message) -> Message:
        """The inner strategy's train message (whose content all nodes share) with this node's own offset added."""
        node = msg.metadata.dst_node_id
        content = RecordDict(dict(msg.content.items()))
        content[DRIFT_OFFSET_KEY] = ArrayRecord({n: Array(a) for n, a in self._gradients[node].offset.items()})
        return Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node)

    def _set_inner_sampling(self, count: int) -> None:
        target = getattr(self.inner, "strategy", self.inner)  # Flower's DP wrappers keep the wrapped one here
        for strategy in {id(self.inner): self.inner, id(target): target}.values():
            for name, value in (("fraction_train", 1.0), ("min_train_nodes", count), ("min_available_nodes", count)):
                if hasattr(strategy, name):
                    setattr(strategy, name, value)

    def _screen(self, server_round: int, node: int, msg: Message) -> CapturedUpdate | NodeDrop:
        if msg.has_error():
            code = msg.error.code
            reason = DropReason.NODE_UNAVAILABLE if code == NODE_UNAVAILABLE_CODE else DropReason.ERROR_REPLY
            return NodeDrop(server_round, node, reason, f"code {code}: {str(msg.error.reason)[:200]}")
        records, metrics = msg.content.array_records, msg.content.metric_records
        if len(records) != 1 or len(metrics) != 1:
            return NodeDrop(server_round, node, DropReason.MALFORMED_REPLY, "need one ArrayRecord and one MetricRecord")
        metric = next(iter(metrics.values()))
        reported = metric.get(WEIGHT_KEY)
        if not isinstance(reported, int) or isinstance(reported, bool) or reported <= 0:
            return NodeDrop(server_round, node, DropReason.MALFORMED_REPLY, f"{WEIGHT_KEY} must be a positive int")
        try:
            update = {name: a.numpy() for name, a in next(iter(records.values())).items()}
        except Exception as err:  # Flower raises several types for undecodable arrays; all mean the same here
            return NodeDrop(server_round, node, DropReason.MALFORMED_REPLY, f"undecodable arrays: {type(err).__name__}")
        shapes = {name: tuple(a.shape) for name, a in update.items()}
        if shapes != self._global_shapes or not all(np.isfinite(a).all() for a in update.values()):
            return NodeDrop(server_round, node, DropReason.MALFORMED_REPLY, "arrays differ from the global model's")
        weight = 1  # set for the whole round in aggregate_train (FIXED weights depend on every accepted node)
        values = {k: float(v) for k, v in metric.items() if isinstance(v, (int, float))}
        queried = self._gradients.get(node)
        return CapturedUpdate(
            server_round,
            node,
            update,
            arrays_sha256(update),
            self._global_sha256,
            reported,
            weight,
            values,
            gradient=None if queried is None else queried.gradient,
            gradient_sha256=None if queried is None else queried.gradient_sha256,
            drift_offset_sha256=None if queried is None else queried.offset_sha256,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[CapturedUpdate] = []
        accepted: list[Message] = []
        round_drops: list[NodeDrop] = []
        answered: set[int] = set()
        destination = {m.metadata.message_id: m.metadata.dst_node_id for m in self._outbox}
        for msg in list(replies):
            node = destination.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if node not in self._sent or node in answered:
                round_drops.append(NodeDrop(server_round, node, DropReason.UNEXPECTED_NODE))
                continue
            answered.add(node)
            outcome = self._screen(server_round, node, msg)
            if isinstance(outcome, NodeDrop):
                round_drops.append(outcome)
                continue
            updates.append(outcome)
            accepted.append(msg)
        # FedAvg sums the float32 updates in list order and float addition is not associative: in arrival order
        # the same updates gave a different global model (up to 3 points of PLAID accuracy after 40 rounds) each
        # run. In node-id order the global model follows from the recorded updates alone, as the offsets do.
        by_node = sorted(range(len(updates)), key=lambda k: updates[k].node_id)
        updates, accepted = [updates[k] for k in by_node], [accepted[k] for k in by_node]
        weights = self._round_weights(server_round, updates)
        updates = [dataclasses.replace(u, weight=weights[u.node_id]) for u in updates]
        for msg, update in zip(accepted, updates, strict=True):
            next(iter(msg.content.metric_records.values()))[WEIGHT_KEY] = update.weight
            # FedAvgM pairs the update's arrays with the global model's by position, not by name: hand it every
            # update in the global model's order (a packed reply comes back in canonical name order).
            key = next(iter(msg.content.array_records))
            msg.content[key] = ArrayRecord({name: Array(update.arrays[name]) for name in self._global_shapes})
        round_drops += [NodeDrop(server_round, n, DropReason.NO_REPLY) for n in sorted(self._sent - answered)]
        for drop in round_drops:
            if drop.reason in (DropReason.NO_REPLY, DropReason.NODE_UNAVAILABLE):
                self.dropped[drop.node_id] = drop
        self.drops.extend(round_drops)
        self.sink.on_round(
            RoundCapture(
                self.run_id, server_round, self._global_sha256, tuple(updates), tuple(self._query_drops + round_drops)
            )
        )
        if len(updates) < self.min_nodes:
            raise JobFailedError(
                "too_few_replies",
                "too few usable updates",
                round=server_round,
                usable=len(updates),
                minimum=self.min_nodes,
            )
        return self.inner.aggregate_train(server_round, accepted)

    def _round_weights(self, server_round: int, updates: list[CapturedUpdate]) -> dict[int, int]:
        return self._weights_for(server_round, {u.node_id: u.examples_reported for u in updates})

    def _weights_for(self, server_round: int, reported: Mapping[int, int]) -> dict[int, int]:
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

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.federated_evaluate:
            return []  # evaluated centrally on the buyer's validation set (evaluate_fn): no extra round trip
        live = frozenset(self._sent - set(self.dropped))
        target = getattr(self.inner, "strategy", self.inner)
        for name, value in (("fraction_evaluate", 1.0), ("min_evaluate_nodes", len(live))):
            if hasattr(target, name):
                setattr(target, name, value)
        return self.inner.configure_evaluate(server_round, arrays, config, cast(Grid, _SelectedNodes(grid, live)))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if not self.federated_evaluate:
            return None
        return self.inner.aggregate_evaluate(server_round, [r for r in replies if not r.has_error()])
