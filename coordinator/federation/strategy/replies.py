"""Screening a node's reply (a train update or a gradient) before anything uses it, and finding which node sent it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message
from flwr.common.constant import ErrorCode

from coordinator.capture.round import DropReason, NDArrays, NodeDrop


def destinations(sent: Iterable[Message]) -> dict[str, int]:
    """Message id -> destination node of messages the grid has pushed (it stamps the ids on push)."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in sent}


def answering_node(reply: Message, sent_to: Mapping[str, int]) -> int:
    """The node `reply` answers for, by the message it replies to: an error the SuperLink generates for a lost node
    names the SuperLink, not the node, as its source."""
    return sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


@dataclass(frozen=True)
class ScreenedReply:
    arrays: NDArrays = field(repr=False)
    examples: int  # the node's own claim: weighs the update only under AggregationWeighting.REPORTED_CAPPED
    metrics: dict[str, float]


def screen_reply(
    reply: Message,
    server_round: int,
    node: int,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    weighted_by_key: str,
    record: str | None = None,
    phase: str = "",
) -> ScreenedReply | NodeDrop:
    """A usable reply carries one ArrayRecord (named `record`, when given) of finite float arrays named and shaped
    like the global model (`shapes`), and one MetricRecord whose `weighted_by_key` is a positive int; anything else is
    the node's drop for the round, with a reason. `phase` prefixes the drop's detail (e.g. "gradient query")."""
    prefix = f"{phase}: " if phase else ""

    def drop(reason: DropReason, detail: str) -> NodeDrop:
        return NodeDrop(server_round, node, reason, prefix + detail)

    if reply.has_error():
        code = reply.error.code
        reason = DropReason.NODE_UNAVAILABLE if code == ErrorCode.NODE_UNAVAILABLE else DropReason.ERROR_REPLY
        return drop(reason, f"code {code}: {str(reply.error.reason)[:200]}")
    records, metrics = reply.content.array_records, reply.content.metric_records
    if (set(records) != {record} if record else len(records) != 1) or len(metrics) != 1:
        return drop(DropReason.MALFORMED_REPLY, f"need one {record or 'ArrayRecord'} and one MetricRecord")
    metric = next(iter(metrics.values()))
    examples = metric.get(weighted_by_key)
    if not isinstance(examples, int) or isinstance(examples, bool) or examples <= 0:
        return drop(DropReason.MALFORMED_REPLY, f"{weighted_by_key} must be a positive int")
    try:
        arrays = {name: a.numpy() for name, a in records[record or next(iter(records))].items()}
    except Exception as err:  # Flower raises several types for undecodable arrays; all mean the same here
        return drop(DropReason.MALFORMED_REPLY, f"undecodable arrays: {type(err).__name__}")
    if {name: tuple(a.shape) for name, a in arrays.items()} != shapes or not all(
        a.dtype.kind == "f" and np.isfinite(a).all() for a in arrays.values()
    ):
        return drop(DropReason.MALFORMED_REPLY, "arrays differ from the global model's")
    values = {k: float(v) for k, v in metric.items() if isinstance(v, (int, float))}
    return ScreenedReply(arrays, examples, values)
