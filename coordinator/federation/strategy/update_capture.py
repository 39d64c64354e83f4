"""Update capture: every train reply screened, weighed and handed to attribution before the round is aggregated."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.capture.round import CapturedUpdate, DropReason, NodeDrop, RoundCapture, UpdateSink
from coordinator.federation.strategy.drift_correction import QueriedGradient
from coordinator.federation.strategy.participation import Participation
from coordinator.federation.strategy.replies import answering_node, destinations, screen_reply
from coordinator.federation.strategy.weights import RoundWeights
from coordinator.federation.strategy.wrapper import StrategyWrapper
from protocol.tasks.arrays import arrays_sha256


class UpdateCapture(StrategyWrapper):
    """Captures every node's update for attribution and hands the wrapped strategy only usable ones, in node-id order,
    weighted by the job's rule.

    Each train reply is matched to the node it answers, screened (replies.screen_reply) and hashed; the round's
    accepted updates, with its drops, go to `sink` as a RoundCapture before aggregation. A node that does not reply
    before the round's deadline or that the SuperLink reports lost is gone for the job; an error or a malformed reply
    drops it from the round. With fewer usable updates than the participation's minimum the job fails with
    `too_few_replies`, after the sink has the round.

    Parameters
    ----------
    strategy:
        The wrapped strategy: FedAvg, FedAvgM, Flower's DP wrapper around FedAvg, or DriftCorrection around one.
    sink:
        Receives every round's capture before aggregation (attribution, the capture on disk).
    participation:
        The job's drops and minimum, shared with the job's other wrappers.
    weights:
        The job's weighting rule; each accepted reply's `weighted_by_key` is set to its weight before aggregation.
    run_id:
        The Flower run id, recorded in captures (default 0).
    queried_gradient:
        Node id -> the gradient the node answered the round's gradient query with and the offset it was sent
        (`DriftCorrection.queried`), recorded with its update; default None: the job has no drift correction.
    weighted_by_key:
        The MetricRecord key of a reply's example count, which FedAvg weighs by (its `weighted_by_key`).
    """

    def __init__(
        self,
        strategy: Strategy,
        sink: UpdateSink,
        participation: Participation,
        weights: RoundWeights,
        *,
        weighted_by_key: str,
        run_id: int = 0,
        queried_gradient: Callable[[int], QueriedGradient | None] | None = None,
    ) -> None:
        super().__init__(strategy)
        self.sink = sink
        self.participation = participation
        self.weights = weights
        self.run_id = run_id
        self.queried_gradient = queried_gradient
        self.weighted_by_key = weighted_by_key
        self._sent: list[Message] = []
        self._global_sha256 = ""
        self._global_shapes: dict[str, tuple[int, ...]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        global_arrays = {name: a.numpy() for name, a in arrays.items()}
        self._global_sha256 = arrays_sha256(global_arrays)
        self._global_shapes = {name: tuple(a.shape) for name, a in global_arrays.items()}
        # Kept so replies can be matched to nodes by the message they answer (replies.answering_node).
        self._sent = list(self.strategy.configure_train(server_round, arrays, config, grid))
        return self._sent

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sent_to = destinations(self._sent)
        sent_nodes = set(sent_to.values())
        accepted: dict[int, tuple[Message, CapturedUpdate]] = {}
        drops: list[NodeDrop] = []
        answered: set[int] = set()
        for reply in list(replies):
            node = answering_node(reply, sent_to)
            if node not in sent_nodes or node in answered:
                drops.append(NodeDrop(server_round, node, DropReason.UNEXPECTED_NODE))
                continue
            answered.add(node)
            outcome = self._capture(server_round, node, reply)
            if isinstance(outcome, NodeDrop):
                drops.append(outcome)
            else:
                accepted[node] = (reply, outcome)
        drops += [NodeDrop(server_round, n, DropReason.NO_REPLY) for n in sorted(sent_nodes - answered)]
        self.participation.record(drops)
        # FedAvg sums the float32 updates in list order and float addition is not associative: in arrival order
        # the same updates gave a different global model (up to 3 points of PLAID accuracy after 40 rounds) each
        # run. In node-id order the global model follows from the recorded updates alone, as the offsets do.
        order = sorted(accepted)
        weights = self.weights(server_round, {node: accepted[node][1].examples_reported for node in order})
        updates = [dataclasses.replace(accepted[node][1], weight=weights[node]) for node in order]
        messages = [accepted[node][0] for node in order]
        for message, update in zip(messages, updates, strict=True):
            next(iter(message.content.metric_records.values()))[self.weighted_by_key] = update.weight
            # FedAvgM pairs the update's arrays with the global model's by position, not by name: hand it every
            # update in the global model's order (a packed reply comes back in canonical name order).
            key = next(iter(message.content.array_records))
            message.content[key] = ArrayRecord({name: Array(update.arrays[name]) for name in self._global_shapes})
        self.sink.on_round(
            RoundCapture(
                self.run_id,
                server_round,
                self._global_sha256,
                tuple(updates),
                self.participation.exchange_drops(server_round),
            )
        )
        self.participation.require(
            len(updates), "too_few_replies", "too few usable updates", round=server_round, usable=len(updates)
        )
        return self.strategy.aggregate_train(server_round, messages)

    def _capture(self, server_round: int, node: int, reply: Message) -> CapturedUpdate | NodeDrop:
        screened = screen_reply(reply, server_round, node, self._global_shapes, weighted_by_key=self.weighted_by_key)
        if isinstance(screened, NodeDrop):
            return screened
        queried = None if self.queried_gradient is None else self.queried_gradient(node)
        return CapturedUpdate(
            server_round,
            node,
            screened.arrays,
            arrays_sha256(screened.arrays),
            self._global_sha256,
            screened.examples,
            1,  # the round's weights depend on every accepted node: set in aggregate_train
            screened.metrics,
            gradient=None if queried is None else queried.gradient,
            gradient_sha256=None if queried is None else queried.gradient_sha256,
            drift_offset_sha256=None if queried is None else queried.offset_sha256,
        )
