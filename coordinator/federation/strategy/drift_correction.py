"""The drift correction's wrapper: a gradient query before each round's training, and each node's offset in its train
message (the arithmetic is protocol.tasks.drift's)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.capture.round import DropReason, NDArrays, NodeDrop
from coordinator.federation.strategy.participation import Participation
from coordinator.federation.strategy.replies import ScreenedReply, answering_node, destinations, screen_reply
from coordinator.federation.strategy.selection import NodeView
from coordinator.federation.strategy.weights import RoundWeights
from coordinator.federation.strategy.wrapper import StrategyWrapper
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.drift import DRIFT_OFFSET_KEY, GRADIENT_KEY, QUERY_GRADIENT, drift_offsets

QUERY_PHASE = "gradient query"
"""The detail every drop of the query phase starts with."""


@dataclass(frozen=True)
class QueriedGradient:
    """A node's answer to a round's gradient query and the offset computed for it (protocol.tasks.drift)."""

    gradient: NDArrays = field(repr=False)
    gradient_sha256: str
    offset: dict[str, npt.NDArray[np.float32]] = field(repr=False)
    offset_sha256: str


class DriftCorrection(StrategyWrapper):
    """SCAFFOLD-style drift correction around a strategy (protocol.tasks.drift, docs/federated.md).

    Each round, before the wrapped strategy builds its train messages, every node its grid lists is sent a
    `query.gradient` message carrying the global model; the nodes that do not answer it within `query_timeout` are
    dropped as in the train phase (gone for the job), an error or malformed answer drops the node from the round
    (every drop's detail starts with "gradient query"), and fewer usable gradients than the participation's minimum
    fail the job with `too_few_replies`. The gradients are averaged with the round's weights, and the wrapped strategy
    trains only the nodes that answered, each train message carrying that node's offset (ArrayRecord `drift-offset`).
    Not with DP: the gradient would leave the device unclipped and unnoised (JobRunConfig refuses the combination).

    Parameters
    ----------
    strategy:
        The wrapped strategy (FedAvg or FedAvgM).
    strength:
        In (0, 1]: the offset is strength * (g - g_i); 1 is the measured correction.
    participation:
        The job's drops and minimum, shared with the job's other wrappers.
    weights:
        The job's weighting rule; the mean gradient uses the weights the round's updates will have.
    query_timeout:
        Seconds to wait for the query's replies (default 120).
    weighted_by_key:
        The MetricRecord key of a reply's example count, which FedAvg weighs by (its `weighted_by_key`).
    """

    def __init__(
        self,
        strategy: Strategy,
        strength: float,
        participation: Participation,
        weights: RoundWeights,
        *,
        weighted_by_key: str,
        query_timeout: float = 120.0,
    ) -> None:
        super().__init__(strategy)
        if not 0 < strength <= 1:
            raise ValueError(f"drift correction strength must be in (0, 1], got {strength}")
        self.strength = strength
        self.participation = participation
        self.weights = weights
        self.query_timeout = query_timeout
        self.weighted_by_key = weighted_by_key
        self._answers: dict[int, QueriedGradient] = {}

    def queried(self, node_id: int) -> QueriedGradient | None:
        """What `node_id` answered this round's query with, and the offset it was sent (None: not in training)."""
        return self._answers.get(node_id)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._answers = self._query(server_round, arrays, grid)
        messages = list(self.strategy.configure_train(server_round, arrays, config, NodeView(grid, self._answers)))
        for message in messages:
            # FedAvg's messages share one content: each gets its own, with its node's offset beside the model.
            offset = self._answers[message.metadata.dst_node_id].offset
            content = RecordDict(dict(message.content.items()))
            content[DRIFT_OFFSET_KEY] = ArrayRecord({name: Array(a) for name, a in offset.items()})
            message.content = content
        return messages

    def _query(self, server_round: int, arrays: ArrayRecord, grid: Grid) -> dict[int, QueriedGradient]:
        """Each listed node's gradient at the global model, screened, and the offsets the usable ones give."""
        asked = frozenset(grid.get_node_ids())
        queries = [
            Message(
                content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                message_type=f"{MessageType.QUERY}.{QUERY_GRADIENT}",
                dst_node_id=node,
            )
            for node in sorted(asked)
        ]
        replies = list(grid.send_and_receive(queries, timeout=self.query_timeout))
        sent_to = destinations(queries)
        shapes = {name: tuple(a.numpy().shape) for name, a in arrays.items()}
        accepted: dict[int, ScreenedReply] = {}
        drops: list[NodeDrop] = []
        for reply in replies:
            node = answering_node(reply, sent_to)
            if node not in asked or node in accepted or any(d.node_id == node for d in drops):
                drops.append(NodeDrop(server_round, node, DropReason.UNEXPECTED_NODE, QUERY_PHASE))
                continue
            screened = screen_reply(
                reply,
                server_round,
                node,
                shapes,
                weighted_by_key=self.weighted_by_key,
                record=GRADIENT_KEY,
                phase=QUERY_PHASE,
            )
            if isinstance(screened, NodeDrop):
                drops.append(screened)
            else:
                accepted[node] = screened
        answered = set(accepted) | {d.node_id for d in drops}
        drops += [NodeDrop(server_round, n, DropReason.NO_REPLY, QUERY_PHASE) for n in sorted(asked - answered)]
        self.participation.record(drops)
        self.participation.require(
            len(accepted), "too_few_replies", "too few usable gradients", round=server_round, usable=len(accepted)
        )
        weights = self.weights(server_round, {node: reply.examples for node, reply in accepted.items()})
        gradients = {node: reply.arrays for node, reply in accepted.items()}
        offsets = drift_offsets(gradients, weights, self.strength)
        return {
            node: QueriedGradient(gradient, arrays_sha256(gradient), offsets[node], arrays_sha256(offsets[node]))
            for node, gradient in gradients.items()
        }
