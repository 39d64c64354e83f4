"""Round captures on disk: `round-NNNNNN.json` (hashes, weights, drops) and one `.npz` per delivered update.

The ServerApp writes them under `output-dir/run-<run id>/` (the coordinator points every job's `output-dir` at
`[federation] jobs_dir`), so a report's run id and round name exactly one summary file. A summary is written
atomically after the round's updates, and never changes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.capture.round import CapturedUpdate, DropReason, NDArrays, NodeDrop, RoundCapture
from protocol.tasks.arrays import arrays_sha256


def capture_summary_path(jobs_dir: Path, run_id: int, server_round: int) -> Path:
    """Where the strategy writes `run_id`'s round summary (CaptureDirectory.round_path under `run-<id>`)."""
    return jobs_dir / f"run-{run_id}" / f"round-{server_round:06d}.json"


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

    def record_validation(self, server_round: int, metrics: dict[str, float], seconds: float | None) -> None:
        """`validation-NNNNNN.json`: the global model after `server_round` scored on the buyer's validation set, and
        the round's wall time (None for round 0, the initial model), written atomically as each round ends so that
        `job start` prints every round while the run goes on (outcome.json has them all only at the end)."""
        doc = {"round": server_round, "metrics": metrics, "seconds": seconds}
        _write_atomically(validation_path(self.directory, server_round), json.dumps(doc).encode())

    def load_round(self, server_round: int) -> RoundCapture:
        """Read a round back with its arrays, re-hashing every stored update (a tampered .npz shows as a hash
        mismatch against the summary's own hashes, which `read_round_summary` alone would not notice)."""
        summary = read_round_summary(self.round_path(server_round).read_bytes(), server_round)
        updates = []
        for u in summary.updates:
            arrays = self._read_npz(self.directory / f"round-{server_round:06d}-node-{u.node_id}.npz")
            gradient = None
            if u.gradient_sha256 is not None:
                gradient = self._read_npz(self._gradient_path(server_round, u.node_id))
            updates.append(
                dataclasses.replace(
                    u,
                    arrays=arrays,
                    update_sha256=arrays_sha256(arrays),
                    gradient=gradient,
                    gradient_sha256=None if gradient is None else arrays_sha256(gradient),
                )
            )
        return dataclasses.replace(summary, updates=tuple(updates))

    @staticmethod
    def _read_npz(path: Path) -> NDArrays:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}


def validation_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / f"validation-{server_round:06d}.json"


def read_validation(run_dir: Path, server_round: int) -> tuple[dict[str, float], float | None] | None:
    """The metrics and wall time `record_validation` wrote for `server_round`; None while there is none yet."""
    try:
        doc = json.loads(validation_path(run_dir, server_round).read_bytes())
    except FileNotFoundError:
        return None
    seconds = doc["seconds"]
    return {str(k): float(v) for k, v in doc["metrics"].items()}, None if seconds is None else float(seconds)


def read_round_summary(data: bytes, server_round: int) -> RoundCapture:
    """A round summary (`round-NNNNNN.json`) with the hashes the strategy computed when Flower delivered each update,
    without the arrays.

    Not `CaptureDirectory.load_round`, which re-reads and re-hashes every node's .npz (attribution needs the arrays):
    measured, that made the contribution gate's cross-check cost as much again as all of screening
    (bench/contribution_gate_bench.py), and the summary is the coordinator's own file, written atomically after the
    updates.
    """
    summary: dict[str, Any] = json.loads(data)
    if int(summary["round"]) != server_round:
        raise ValueError(f"summary of round {summary['round']} in the file of round {server_round}")
    global_sha256 = str(summary["global_sha256"])
    updates = tuple(
        CapturedUpdate(
            round=server_round,
            node_id=int(u["node_id"]),
            arrays={},
            update_sha256=str(u["update_sha256"]),
            global_sha256=global_sha256,
            examples_reported=int(u["examples_reported"]),
            weight=int(u["weight"]),
            metrics={k: float(v) for k, v in u["metrics"].items()},
            gradient_sha256=u.get("gradient_sha256"),
            drift_offset_sha256=u.get("drift_offset_sha256"),
        )
        for u in summary["updates"]
    )
    drops = tuple(
        NodeDrop(server_round, int(d["node_id"]), DropReason(d["reason"]), str(d["detail"])) for d in summary["drops"]
    )
    return RoundCapture(int(summary["run_id"]), server_round, global_sha256, updates, drops)
