"""From the sample store to a task's window file: the hand-off between sensing and federated training.

When the MID invites the device to a job, the agent cuts the task's windows from its own store (`WindowSource.cut`)
into the .npz window file that the SuperNode's ClientApp reads (`protocol.tasks.windows`), so a Flower task process
never opens the live store. The file's fingerprint is the Merkle root of the window hashes (edge.sensors.fingerprint)
and the per-window hashes travel with it (`hashes`, (n, 32) uint8), so a round that trains on a subset can name
exactly that subset: `dataset_fingerprint(hashes[idx])`.

How a task's windows are cut is the task spec's to say (`window_mode`, `window_stride`), never a list of task ids:
- inputs: only a sensor with every input channel in the input's unit, of one of the inputs' sources (the kind of
  sensor the store recorded with the data), is cut; any other is refused with the reason, never renamed.
- classification: labelled windows only, labels mapped to the task's classes by name; a sensor whose labels have
  no names, or names the task does not have, is refused rather than relabelled.
- forecast: sliding windows of `window_length + 1`; x is the first `window_length` samples, y the last one (the next
  sample of every feature), so the hash commits to input and target together.
- autoencoder: windows of `window_length`, no targets.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge.sensors.errors import MissingInputsError, TooFewWindowsError
from edge.sensors.store import SampleStore
from protocol.tasks.spec import TaskKind, TaskSpec

if TYPE_CHECKING:
    # Imported when windows are cut, not by the idle agent that holds a WindowSource (BENCHMARKS.md, "Raspberry Pi
    # hub": numpy is 20 MB of a 512 MB board).
    import numpy as np

    from edge.sensors.windows import Windows, WindowSpec
    from protocol.tasks.windows import WindowSet

FINGERPRINT_PREFIX = "merkle-sha256:"


def window_spec_for(task: TaskSpec, sensor: str, *, max_gap_ms: int | None = None) -> WindowSpec:
    """How `task`'s windows are cut from `sensor`'s samples (see the module docstring): only from a version of the
    sensor with the task's inputs in their units, of a source every input takes."""
    from edge.sensors.windows import WindowSpec

    length = task.window_length + 1 if task.kind is TaskKind.FORECAST else task.window_length
    classification = task.kind is TaskKind.CLASSIFICATION
    first, *others = task.inputs
    return WindowSpec(
        sensor,
        task.features,
        length,
        mode=task.window_mode,
        stride=task.window_stride,
        labelled=classification,
        classes=task.labels if classification else None,
        units=tuple(i.unit for i in task.inputs),
        sources=tuple(s for s in first.sources if all(s in other.sources for other in others)),
        max_gap_ms=max_gap_ms,
    )


def _only(spec: WindowSpec, allowed_sources: tuple[str, ...] | None) -> WindowSpec:
    """`spec` restricted to sensors of the kinds the member allows for the task (None: as it is)."""
    if allowed_sources is None:
        return spec
    return dataclasses.replace(spec, sources=tuple(s for s in (spec.sources or ()) if s in allowed_sources))


def task_window_set(task: TaskSpec, windows: Windows) -> WindowSet:
    """Windows cut by `window_spec_for(task, ...)` as the WindowSet a ClientApp trains on."""
    import numpy as np

    from protocol.tasks.windows import WindowSet

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


def write_window_file(path: Path, window_set: WindowSet, windows: Windows) -> None:
    """Write (x, y, fingerprint, hashes) atomically to `path`, so a ClientApp never reads a half-written file."""
    import numpy as np

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


def export_task_windows(
    store: SampleStore, task: TaskSpec, sensor: str, path: Path, *, limit: int | None = None
) -> tuple[WindowSet, Windows]:
    """Cut `task`'s windows from `sensor` and write them to the window file `path`."""
    windows = store.windows(window_spec_for(task, sensor), limit=limit)
    window_set = task_window_set(task, windows)
    write_window_file(path, window_set, windows)
    return window_set, windows


@dataclass(frozen=True)
class CutWindows:
    """What a job's window file holds: from which sensor, how many windows, per class, and their fingerprint."""

    task: str
    sensor: str
    path: Path
    count: int
    fingerprint: str
    per_class: dict[str, int]


@dataclass(frozen=True)
class WindowSource:
    """Where a job's windows come from: the device's sample store, and how many windows a job takes.

    Parameters
    ----------
    store_path: the agent's sample store (read-only here; the daemon keeps writing it).
    min_windows: fewer fitting windows than this and the job is declined; default 1.
    max_windows: at most this many windows go into a job, the oldest first; default None (all).
    """

    store_path: Path
    min_windows: int = 1
    max_windows: int | None = None

    def cut(self, task: TaskSpec, path: Path, allowed_sources: tuple[str, ...] | None = None) -> CutWindows:
        """Cut `task`'s windows from the store's best fitting sensor (the one giving the most windows) into `path`.
        `allowed_sources`: only sensors of these kinds (the member's consent for the task); None: every kind.

        Raises MissingInputsError (no sensor has the task's inputs, units, sources and class names; its details say
        why, per sensor, or that there is no store), TooFewWindowsError (fewer than `min_windows`). Blocking: run it
        in a worker thread."""
        if not self.store_path.is_file():
            raise MissingInputsError("no sample store", path=str(self.store_path), task=task.key)
        inputs = _only(window_spec_for(task, ""), allowed_sources)
        with SampleStore(self.store_path, readonly=True) as store:
            fitting, misfits = store.fitting_sensors(inputs)
            if not fitting:
                raise MissingInputsError(
                    "the store has no data with the task's inputs",
                    task=task.key,
                    features=task.features,
                    sensors=misfits,
                )
            best: tuple[str, Windows] | None = None
            for sensor in fitting:
                windows = store.windows(_only(window_spec_for(task, sensor), allowed_sources), limit=self.max_windows)
                if best is None or len(windows) > len(best[1]):
                    best = (sensor, windows)
        assert best is not None
        sensor, windows = best
        if len(windows) < self.min_windows:
            raise TooFewWindowsError(
                "too few windows for the task",
                task=task.key,
                sensor=sensor,
                found=len(windows),
                needed=self.min_windows,
            )
        window_set = task_window_set(task, windows)
        write_window_file(path, window_set, windows)
        per_class: dict[str, int] = {}
        if task.labels:
            import numpy as np

            counts = np.bincount(windows.y, minlength=len(task.labels))
            per_class = {name: int(n) for name, n in zip(task.labels, counts, strict=True) if n}
        return CutWindows(task.key, sensor, path, len(windows), window_set.fingerprint, per_class)
