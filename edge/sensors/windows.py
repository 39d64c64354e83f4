"""Training windows read from the sample store: what to cut (`WindowSpec`) and what comes out (`Windows`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from edge.sensors.fingerprint import dataset_fingerprint, window_hash

WindowMode = Literal["sliding", "segment"]


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """How to cut windows for a task.

    Parameters
    ----------
    sensor:
        Name of the sensor whose samples are cut (a window never mixes sensors).
    features:
        Channel names in array order; a task's `features` (protocol.tasks.spec.TaskSpec).
    length:
        Samples per window and channel; a task's `window_length`.
    mode:
        "sliding" (default): runs of consecutive good samples, cut every `stride` samples. "segment": one window per
        recorded segment (e.g. one PLAID recording), resampled by linear interpolation to `length`.
    stride:
        Sliding step in samples; default `length` (non-overlapping).
    labelled:
        Only windows whose samples all carry the same label (classification); default False.
    max_gap_ms:
        A gap between consecutive samples larger than this starts a new run; default None (no gap check).
    since_ms, until_ms:
        Only samples with since_ms <= t_ms < until_ms; default all.
    """

    sensor: str
    features: tuple[str, ...]
    length: int
    mode: WindowMode = "sliding"
    stride: int | None = None
    labelled: bool = False
    max_gap_ms: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def __post_init__(self) -> None:
        if self.length < 1 or (self.stride is not None and self.stride < 1):
            raise ValueError("length and stride must be positive")
        if not self.features:
            raise ValueError("a window needs at least one feature")


@dataclass(frozen=True, slots=True)
class Windows:
    """Windows as arrays: X float32 (n, channels, length); y int64 (n,), -1 where unlabelled; t_start_ms int64 (n,);
    hashes (n, 32) uint8, the per-window hashes the dataset fingerprint commits to."""

    X: np.ndarray
    y: np.ndarray
    t_start_ms: np.ndarray
    hashes: np.ndarray

    @staticmethod
    def empty(channels: int, length: int) -> Windows:
        return Windows(
            np.zeros((0, channels, length), np.float32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros((0, 32), np.uint8),
        )

    @staticmethod
    def build(X: np.ndarray, y: np.ndarray, t_start_ms: np.ndarray) -> Windows:
        hashes = np.frombuffer(
            b"".join(window_hash(int(t), int(lab), x) for x, lab, t in zip(X, y, t_start_ms, strict=True)),
            dtype=np.uint8,
        ).reshape(-1, 32)
        return Windows(X, y, t_start_ms, hashes)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def subset(self, indices: np.ndarray | list[int]) -> Windows:
        """The windows at `indices`, in that order (e.g. a round's shuffled or sampled selection)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Windows(self.X[idx], self.y[idx], self.t_start_ms[idx], self.hashes[idx])

    def fingerprint(self) -> bytes:
        """Merkle root over these windows' hashes in this order (see edge.sensors.fingerprint)."""
        return dataset_fingerprint([bytes(h) for h in self.hashes])

    @staticmethod
    def concat(parts: list[Windows], channels: int, length: int) -> Windows:
        if not parts:
            return Windows.empty(channels, length)
        return Windows(
            np.concatenate([p.X for p in parts]),
            np.concatenate([p.y for p in parts]),
            np.concatenate([p.t_start_ms for p in parts]),
            np.concatenate([p.hashes for p in parts]),
        )
