"""PLAID, the reference real data set, read from the sktime wheel that ships it (never downloaded at run time).

PLAID (Plug-Load Appliance Identification Dataset, Gao et al. 2014) holds current recordings of 11 kinds of household
appliance from 56 homes in Pittsburgh; the UCR archive version in sktime 1.2 (`sktime/datasets/data/PLAID`) has 537
train and 537 test series, univariate, of varying length (100 to 1,344 points).

Fixed-length windows: a classifier needs one length, so each whole series is resampled by linear interpolation to
`length` points (default 128, as task `plaid-appliance@1` uses). Resampling keeps the entire waveform of every
recording, short or long, where cropping would cut the start-up transient of long ones and padding would add
silence to short ones; the series count and labels stay exactly those of the data set.

Only the package's location is looked up (`importlib.util.find_spec`), so sktime's own heavy imports never run.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from edge.sensors.errors import SensorUnavailableError
from edge.sensors.tsfile import TsDataset, read_ts
from protocol.tasks.spec import PLAID_APPLIANCE

PLAID_PACKAGE = "sktime"
PLAID_SUBDIR = ("datasets", "data", "PLAID")
PLAID_DEFAULT_LENGTH = 128

# Index order of the file's class labels 0..10 (header comment of PLAID_TRAIN.ts); the plaid-appliance task names
# them in that same order, so the task spec is the one place they are written down.
PLAID_CLASSES: tuple[str, ...] = PLAID_APPLIANCE.labels
# What a PLAID replay records (edge.sensors.replay.plaid_replay): the task's one input, its unit and its source.
PLAID_CHANNELS: tuple[str, ...] = PLAID_APPLIANCE.features
PLAID_UNITS: tuple[str, ...] = tuple(i.unit for i in PLAID_APPLIANCE.inputs)
PLAID_SOURCE = "plaid"

Split = Literal["train", "test", "all"]


@dataclass(frozen=True, slots=True)
class LabelledWindows:
    """Fixed-length labelled windows: X float32 (n, length), y int64 (n,) indexing `class_names`."""

    X: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        found = np.bincount(self.y, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, found, strict=True)}


def plaid_dir() -> Path:
    """The installed PLAID folder; raises SensorUnavailableError naming the package when it is not installed."""
    spec = importlib.util.find_spec(PLAID_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        folder = Path(root).joinpath(*PLAID_SUBDIR)
        if (folder / "PLAID_TRAIN.ts").is_file():
            return folder
    raise SensorUnavailableError(
        "PLAID data files not found; install the pinned sktime wheel (pip install 'sktime==1.2.*')",
        package=PLAID_PACKAGE,
        searched=roots,
    )


def plaid_files(split: Split = "all") -> list[Path]:
    folder = plaid_dir()
    names = {"train": ["PLAID_TRAIN.ts"], "test": ["PLAID_TEST.ts"], "all": ["PLAID_TRAIN.ts", "PLAID_TEST.ts"]}
    return [folder / n for n in names[split]]


def load_plaid_series(split: Split = "all") -> list[TsDataset]:
    """The raw variable-length series of a split, one TsDataset per file (train first)."""
    return [read_ts(path) for path in plaid_files(split)]


def resample(values: np.ndarray, length: int) -> np.ndarray:
    """Linear interpolation of a 1-D series onto `length` evenly spaced points spanning the whole series.
    Requires values.size >= 1 and length >= 1."""
    if values.size == 1:
        return np.full(length, values[0], dtype=np.float32)
    source = np.linspace(0.0, 1.0, values.size)
    target = np.linspace(0.0, 1.0, length)
    return np.interp(target, source, values.astype(np.float64)).astype(np.float32)


def load_plaid(split: Split = "train", length: int = PLAID_DEFAULT_LENGTH) -> LabelledWindows:
    """PLAID as labelled fixed-length windows: one window per recording, resampled to `length` points.

    Returns X float32 (n, length), y int64 (n,) and the 11 class names; n is 537 for "train" or "test", 1,074 for
    "all". Raises SensorUnavailableError when sktime is not installed and MalformedError on a damaged file.
    """
    if length < 2:
        raise ValueError("length must be at least 2")
    rows: list[np.ndarray] = []
    labels: list[int] = []
    for dataset in load_plaid_series(split):
        for series in dataset.series:
            if series.label is None:
                raise SensorUnavailableError("PLAID series without a label", line=series.line)
            rows.append(resample(series.values[0], length))
            labels.append(series.label)
    return LabelledWindows(np.stack(rows), np.asarray(labels, dtype=np.int64), PLAID_CLASSES)
