"""Who takes part in a job's rounds: the selected nodes, every drop with its reason, and the fewest nodes a round may
go on with. One `Participation` per job, shared by the wrappers that ask nodes something (selection, the gradient
query, the update capture); the ServerApp writes its drops into the job's outcome."""

from __future__ import annotations

from collections.abc import Iterable

from coordinator.capture.round import DropReason, NodeDrop

NOT_ASKED = frozenset({DropReason.NOT_CONNECTED, DropReason.DROPPED_EARLIER})
"""Drops of nodes a round sent nothing to: in the job's outcome, not in the round's capture."""
GONE_FOR_THE_JOB = frozenset({DropReason.NO_REPLY, DropReason.NODE_UNAVAILABLE})
"""Drops after which a node is not asked again in the job. An error or a malformed reply drops the node from its round
only: the next round may go better."""


class JobFailedError(Exception):
    """The job cannot go on; `reason` is recorded in the job outcome (stable strings)."""

    def __init__(self, reason: str, message: str, **details: object) -> None:
        super().__init__(f"{reason}: {message} {details}")
        self.reason = reason
        self.details = details


class Participation:
    """A job's selected nodes, its drops and its minimum participation.

    Parameters
    ----------
    selected_node_ids:
        The SuperLink node ids the coordinator selected for the job; no other node is ever sent a message.
    min_nodes:
        Fewest nodes a round may go on with, in 1..len(selected_node_ids): with fewer selected nodes connected the job
        fails with reason `too_few_nodes`, with fewer usable replies (gradients or updates) with `too_few_replies`.
    """

    def __init__(self, selected_node_ids: Iterable[int], min_nodes: int) -> None:
        self.selected = frozenset(selected_node_ids)
        if not 1 <= min_nodes <= len(self.selected):
            raise ValueError(f"min_nodes must be in 1..{len(self.selected)}, got {min_nodes}")
        self.min_nodes = min_nodes
        self.drops: list[NodeDrop] = []  # every drop of the job, in the order it happened
        self.gone: dict[int, NodeDrop] = {}  # node id -> the drop after which it is not asked again

    def record(self, drops: Iterable[NodeDrop]) -> None:
        for drop in drops:
            self.drops.append(drop)
            if drop.reason in GONE_FOR_THE_JOB:
                self.gone[drop.node_id] = drop

    def exchange_drops(self, server_round: int) -> tuple[NodeDrop, ...]:
        """The round's drops of nodes it sent a message to, in the order they happened (a round capture's drops)."""
        return tuple(d for d in self.drops if d.round == server_round and d.reason not in NOT_ASKED)

    def require(self, count: int, reason: str, message: str, **details: object) -> None:
        """Raise JobFailedError(`reason`) when `count` nodes are fewer than the job's minimum."""
        if count < self.min_nodes:
            raise JobFailedError(reason, message, **details, minimum=self.min_nodes)
