"""A round capture: what the strategy received from each selected node in one round, and who was dropped.

The strategy hands every round to an `UpdateSink` before aggregation: attribution values it
(coordinator.attribution.round_sink), and `coordinator.capture.directory.CaptureDirectory` keeps it on disk, where the
contribution gate cross-checks signed reports against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import numpy as np
import numpy.typing as npt

NDArrays = dict[str, npt.NDArray[np.generic]]


class DropReason(StrEnum):
    """Why a selected node's update is not in a round. Stable strings: they go into the ledger."""

    NOT_CONNECTED = "not_connected"  # selected, but not connected to the SuperLink when the round started
    NO_REPLY = "no_reply"  # sent a train message, no reply before the round deadline
    NODE_UNAVAILABLE = "node_unavailable"  # the SuperLink reported the node lost (missed heartbeats)
    ERROR_REPLY = "error_reply"  # the node's ClientApp replied with an error
    MALFORMED_REPLY = "malformed_reply"  # the reply does not carry the global model's arrays and a weight
    UNEXPECTED_NODE = "unexpected_node"  # a reply from a node the round did not send to
    DROPPED_EARLIER = "dropped_earlier"  # died in an earlier round of this job and is not asked again
    # A node that fails the drift correction's gradient query (no_reply, node_unavailable, error_reply,
    # malformed_reply, detail "gradient query") is not sent the round's train message.


@dataclass(frozen=True)
class NodeDrop:
    round: int
    node_id: int
    reason: DropReason
    detail: str = ""


@dataclass(frozen=True)
class CapturedUpdate:
    """One node's update as Flower delivered it, with the hashes the node's contribution report must name."""

    round: int
    node_id: int
    arrays: NDArrays = field(repr=False)
    update_sha256: str
    global_sha256: str
    examples_reported: int
    weight: int
    metrics: dict[str, float]
    gradient: NDArrays | None = field(default=None, repr=False)
    """Drift-corrected jobs: the gradient the node returned to the round's query (protocol.tasks.drift)."""
    gradient_sha256: str | None = None
    drift_offset_sha256: str | None = None
    """Drift-corrected jobs: hash of the offset the node was sent with its train message."""


@dataclass(frozen=True)
class RoundCapture:
    run_id: int
    round: int
    global_sha256: str
    updates: tuple[CapturedUpdate, ...]
    drops: tuple[NodeDrop, ...]


class UpdateSink(Protocol):
    """Receives each round before aggregation; the attribution step implements this."""

    def on_round(self, capture: RoundCapture) -> None: ...
