"""Per-node update capture: what the strategy received from each node in each round, and who was dropped.

The strategy hands every round to an `UpdateSink` (the attribution step's hook). `CaptureDirectory` is the default
sink: it keeps each node's update (as .npz) and a round summary (JSON) under the run's output directory, which is
what the coordinator cross-checks signed contribution reports against and what attribution values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from protocol.tasks.arrays import arrays_sha256

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


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


class CaptureDirectory:
    """Default sink: `round-NNNNNN.json` plus `round-NNNNNN-node-ID.npz` per delivered update (and, in drift-corrected
    jobs, `round-NNNNNN-node-ID.gradient.npz`: the gradient the node returned to the round's query)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def on_round(self, capture: RoundCapture) -> None:
        for update in capture.updates:
            path = self.directory / f"round-{capture.round:06d}-node-{update.node_id}.npz"
            tmp = path.with_name(f".{path.name}.tmp")
            with tmp.open("wb") as fh:
                np.savez(fh, **update.arrays)  # type: ignore[arg-type]
            tmp.replace(path)
            if update.gradient is not None:
                self._write_npz(self._gradient_path(capture.round, update.node_id), update.gradient)
        summary = {
            "run_id": capture.run_id,
            "round": capture.round,
            "global_sha256": capture.global_sha256,
            "updates": [
                {
                    "node_id": u.node_id,
                    "update_sha256": u.update_sha256,
                    "examples_reported": u.examples_reported,
                    "weight": u.weight,
                    "metrics": u.metrics,
                    "gradient_sha256": u.gradient_sha256,
                    "drift_offset_sha256": u.drift_offset_sha256,
                }
                for u in capture.updates
            ],
            "drops": [{"node_id": d.node_id, "reason": str(d.reason), "detail": d.detail} for d in capture.drops],
        }
        _write_atomically(self.round_path(capture.round), json.dumps(summary, indent=1).encode())

    @staticmethod
    def _write_npz(path: Path, arrays: NDArrays) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)

    def _gradient_path(self, server_round: int, node_id: int) -> Path:
        return self.directory / f"round-{server_round:06d}-node-{node_id}.gradient.npz"

    def round_path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:06d}.json"

    def load_round(self, server_round: int) -> RoundCapture:
        """Read a round back, re-hashing every stored update (a tampered .npz shows as a hash mismatch)."""
        summary = json.loads(self.round_path(server_round).read_bytes())
        updates = []
        for u in summary["updates"]:
            path = self.directory / f"round-{server_round:06d}-node-{u['node_id']}.npz"
            with np.load(path, allow_pickle=False) as data:
                arrays: NDArrays = {name: data[name] for name in data.files}
            gradient: NDArrays | None = None
            if u.get("gradient_sha256") is not None:
                with np.load(self._gradient_path(server_round, int(u["node_id"])), allow_pickle=False) as data:
                    gradient = {name: data[name] for name in data.files}
            updates.append(
                CapturedUpdate(
                    round=server_round,
                    node_id=int(u["node_id"]),
                    arrays=arrays,
                    update_sha256=arrays_sha256(arrays),
                    global_sha256=str(summary["global_sha256"]),
                    examples_reported=int(u["examples_reported"]),
                    weight=int(u["weight"]),
                    metrics={k: float(v) for k, v in u["metrics"].items()},
                    gradient=gradient,
                    gradient_sha256=None if gradient is None else arrays_sha256(gradient),
                    drift_offset_sha256=u.get("drift_offset_sha256"),
                )
            )
        drops = tuple(
            NodeDrop(server_round, int(d["node_id"]), DropReason(d["reason"]), d["detail"]) for d in summary["drops"]
        )
        return RoundCapture(int(summary["run_id"]), server_round, str(summary["global_sha256"]), tuple(updates), drops)
