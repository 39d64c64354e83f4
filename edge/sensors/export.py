"""From the sample store to a task's window file: the hand-off between sensing and federated training.

The agent exports a task's windows into the .npz window file that the SuperNode's ClientApp reads
(`protocol.tasks.windows`), so a Flower task process never opens the live store. The file's fingerprint is the
Merkle root of the window hashes (edge.sensors.fingerprint) and the per-window hashes travel with it (`hashes`,
(n, 32) uint8), so a round that trains on a subset can name exactly that subset: `dataset_fingerprint(hashes[idx])`.

How a task's windows are cut:
- classification: labelled windows only; a task whose features are one recording per window (PLAID) uses segment
  mode (one window per recording), others sliding windows of `window_length`.
- forecast: sliding windows of `window_length + 1`; x is the first `window_length` samples, y the last one (the next
  sample of every feature), so the hash commits to input and target together.
- autoencoder: sliding windows of `window_length`, no targets.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge.sensors.store import SampleStore
from edge.sensors.windows import WindowMode, Windows, WindowSpec
from protocol.tasks.spec import TaskKind, TaskSpec
from protocol.tasks.windows import WindowSet

FINGERPRINT_PREFIX = "merkle-sha256:"
SEGMENT_TASKS = frozenset({"plaid-appliance"})


def window_spec_for(task: TaskSpec, sensor: str, *, max_gap_ms: int | None = None) -> WindowSpec:
    """How `task`'s windows are cut from `sensor`'s samples (see the module docstring)."""
    if task.kind is TaskKind.CLASSIFICATION:
        mode: WindowMode = "segment" if task.id in SEGMENT_TASKS else "sliding"
        return WindowSpec(sensor, task.features, task.window_length, mode=mode, labelled=True, max_gap_ms=max_gap_ms)
    length = task.window_length + 1 if task.kind is TaskKind.FORECAST else task.window_length
    return WindowSpec(sensor, task.features, length, max_gap_ms=max_gap_ms)


def task_window_set(task: TaskSpec, windows: Windows) -> WindowSet:
    """Windows cut by `window_spec_for(task, ...)` as the WindowSet a ClientApp trains on."""
    fingerprint = FINGERPRINT_PREFIX + windows.fingerprint().hex()
    if task.kind is TaskKind.CLASSIFICATION:
        return WindowSet(x=windows.X, y=windows.y.astype(np.int64), fingerprint=fingerprint)
    if task.kind is TaskKind.FORECAST:
        return WindowSet(
            x=np.ascontiguousarray(windows.X[:, :, :-1]),
            y=np.ascontiguousarray(windows.X[:, :, -1]),
            fingerprint=fingerprint,
        )
    return WindowSet(x=windows.X, y=None, fingerprint=fingerprint)


def export_task_windows(
    store: SampleStore, task: TaskSpec, sensor: str, path: Path, *, limit: int | None = None
) -> tuple[WindowSet, Windows]:
    """Cut `task`'s windows from `sensor` and write them (x, y, fingerprint, hashes) atomically to `path`."""
    windows = store.windows(window_spec_for(task, sensor), limit=limit)
    window_set = task_window_set(task, windows)
    payload: dict[str, np.ndarray] = {
        "x": window_set.x,
        "fingerprint": np.array(window_set.fingerprint),
        "hashes": windows.hashes,
    }
    if window_set.y is not None:
        payload["y"] = window_set.y
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, **payload)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return window_set, windows
