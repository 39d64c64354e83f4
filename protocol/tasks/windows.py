"""Window files: the one on-disk form of a task's windows, for devices and for the buyer's validation set.

The agent exports windows from its sample store into one .npz file per task (x, y, fingerprint) and names it in
the SuperNode's node config (`data-path`), so a Flower task process never opens the live store; the coordinator
reads the buyer's validation windows in the same form. Size, shape and finiteness are checked against the task
spec before any training; pickles are never loaded. numpy only, no torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from protocol.errors import MalformedError, TooLargeError
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.spec import TaskKind, TaskSpec

MAX_WINDOW_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class WindowSet:
    """Windows shaped (n, channels, window_length) float32, targets (or None for autoencoders), and a fingerprint."""

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.generic] | None
    fingerprint: str

    def __len__(self) -> int:
        return len(self.x)


def window_fingerprint(x: npt.NDArray[np.generic], y: npt.NDArray[np.generic] | None) -> str:
    """A content fingerprint of windows and targets (canonical array hash), for sets that come without one."""
    arrays: dict[str, npt.NDArray[np.generic]] = {"x": x} if y is None else {"x": x, "y": y}
    return "sha256:" + arrays_sha256(arrays)


def save_window_file(path: Path, windows: WindowSet) -> None:
    """Write atomically (tmp + rename) so a ClientApp never reads a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    payload: dict[str, npt.NDArray[np.generic]] = {"x": windows.x, "fingerprint": np.array(windows.fingerprint)}
    if windows.y is not None:
        payload["y"] = windows.y
    with tmp.open("wb") as fh:
        np.savez(fh, **payload)  # type: ignore[arg-type]
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_window_file(path: Path, spec: TaskSpec) -> WindowSet:
    """Read and check a window file for `spec`; raises TooLargeError / MalformedError and never loads pickles."""
    size = path.stat().st_size
    if size > MAX_WINDOW_FILE_BYTES:
        raise TooLargeError("window file too large", limit=MAX_WINDOW_FILE_BYTES, found=size)
    try:
        with np.load(path, allow_pickle=False) as data:
            x = np.asarray(data["x"], dtype=np.float32)
            y = np.asarray(data["y"]) if "y" in data.files else None
            fingerprint = str(data["fingerprint"]) if "fingerprint" in data.files else window_fingerprint(x, y)
    except (OSError, ValueError, KeyError) as err:
        raise MalformedError("window file unreadable", path=str(path), error=type(err).__name__) from err
    if x.ndim != 3 or x.shape[1:] != (spec.channels, spec.window_length):
        raise MalformedError("windows do not fit the task", task=spec.key, found=x.shape)
    if not np.isfinite(x).all():
        raise MalformedError("windows contain NaN or infinite values", task=spec.key)
    if spec.kind is not TaskKind.AUTOENCODER and (y is None or len(y) != len(x)):
        raise MalformedError("targets missing or not one per window", task=spec.key)
    return WindowSet(x=x, y=y, fingerprint=fingerprint)
