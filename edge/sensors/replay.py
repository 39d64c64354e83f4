"""Replay of recorded real data as a sensor: CSV files and UCR/UEA `.ts` files (PLAID among them).

A `.ts` replay plays its series one after the other, one value per tick, each sample labelled with the series' class
and grouped by `segment` (the t_ms of the recording's first sample, unique and increasing), so the store can cut
one window per recording. A CSV replay plays rows; an optional `t_ms` column gives the original rate (the median
row spacing), an optional `label` column gives labels (class names, or indexes into `class_names`) and an optional
`segment` column groups rows into recordings. `speed` > 1 plays faster than recorded.

Every replay knows the class names its labels stand for (`class_names`), so the store keeps names and a task's
windows are labelled by name, never by a file's own index order. A replay can be given a slice of its data
(`series=` indices, `classes=` names, and for CSV `channels=` columns), so that each simulated household in a demo
or test plays different appliances. A bad line raises MalformedError for that tick only; the next read continues
with the next line, as a flaky real sensor would. A replay that does not loop raises ReplayEndedError at the end.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from edge.sensors.errors import MalformedError, ReplayEndedError, SensorUnavailableError, TooLargeError
from edge.sensors.plaid import PLAID_CHANNELS, PLAID_CLASSES, PLAID_SOURCE, PLAID_UNITS, Split, plaid_files
from edge.sensors.sample import ChannelSpec, Quality, Sample
from edge.sensors.tsfile import MAX_TS_BYTES, TsSeries, iter_ts

MAX_CSV_BYTES = 256 * 1024 * 1024
MAX_CSV_FIELDS = 65
CSV_KEY_COLUMNS = ("t_ms", "label", "segment")


def _wanted_classes(classes: Sequence[str] | None, class_names: tuple[str, ...]) -> set[int] | None:
    """Label indexes of `classes` (None: all); raises ValueError naming classes the data does not have."""
    if classes is None:
        return None
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
        raise ValueError(f"unknown classes {unknown}; this data set has {list(class_names)}")
    return {class_names.index(c) for c in classes}


class TsReplaySensor:
    """Plays `.ts` series (univariate or multivariate) value by value.

    Parameters
    ----------
    name: sensor name in the store.
    paths: `.ts` files, played in order.
    rate_hz: original sampling rate of the recordings (a `.ts` file does not say); default 100.
    speed: playback speed factor; default 1.0.
    channel_names: names of the dimensions; default ("current",) for univariate files, else dim0..dimN.
    series: indices (over all files, in order) to play, e.g. a list or a `range`; default all.
    classes: class names to play; default all.
    class_names: names of the file's class labels in their @classLabel order; default the labels as written.
    loop: start again after the last series; default True.
    channel_units: the dimensions' units; default none ("").
    source: the kind of sensor that recorded the files (`Sensor.source`); default "replay": of unstated origin, which
        no task takes (a univariate file's channel is named "current" whatever it measured).
    """

    blocking = False

    def __init__(
        self,
        name: str,
        paths: Sequence[Path],
        *,
        rate_hz: float = 100.0,
        speed: float = 1.0,
        channel_names: Sequence[str] | None = None,
        series: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        loop: bool = True,
        channel_units: Sequence[str] | None = None,
        source: str = "replay",
    ) -> None:
        if rate_hz <= 0 or speed <= 0:
            raise ValueError("rate_hz and speed must be positive")
        if not paths:
            raise SensorUnavailableError("replay needs at least one .ts file", sensor=name)
        self.name = name
        self.paths = [Path(p) for p in paths]
        for path in self.paths:
            if not path.is_file():
                raise SensorUnavailableError("no such .ts file", sensor=name, path=str(path))
        self.period_ms = 1000.0 / (rate_hz * speed)
        self.loop = loop
        header, _ = iter_ts(self.paths[0], MAX_TS_BYTES)
        self.class_names = tuple(class_names) if class_names else header.class_labels
        if class_names and len(class_names) != len(header.class_labels):
            raise ValueError(f"{len(class_names)} class names for {len(header.class_labels)} labels in the file")
        names = channel_names or (("current",) if header.dims == 1 else tuple(f"dim{i}" for i in range(header.dims)))
        if len(names) != header.dims:
            raise ValueError(f"{len(names)} channel names for {header.dims} dimensions")
        units = channel_units or ("",) * len(names)
        if len(units) != len(names):
            raise ValueError(f"{len(units)} channel units for {len(names)} channels")
        self.channels = tuple(ChannelSpec(n, u) for n, u in zip(names, units, strict=True))
        self.source = source
        # A range stays a range: `in` is O(1) and an open-ended slice needs no list of every index.
        self._wanted_series = series if series is None or isinstance(series, range) else frozenset(series)
        self._wanted_labels = _wanted_classes(classes, self.class_names)
        self._items = self._iterate()
        self._current: TsSeries | None = None
        self._pos = 0
        self._segment = 0

    def _iterate(self) -> Iterator[TsSeries | MalformedError]:
        index = 0
        for path in self.paths:
            _, items = iter_ts(path, MAX_TS_BYTES)
            for item in items:
                at = index
                index += 1
                if isinstance(item, MalformedError):
                    yield item
                    continue
                if self._wanted_series is not None and at not in self._wanted_series:
                    continue
                if self._wanted_labels is not None and item.label not in self._wanted_labels:
                    continue
                yield item

    def _next_series(self) -> TsSeries:
        restarted = False
        while True:
            item = next(self._items, None)
            if item is None:
                if not self.loop:
                    raise ReplayEndedError("replay played all its series", sensor=self.name)
                if restarted:
                    raise SensorUnavailableError("replay has no series to play", sensor=self.name)
                restarted = True
                self._items = self._iterate()
                continue
            if isinstance(item, MalformedError):
                raise item
            return item

    def read(self, t_ms: int) -> Sample:
        if self._current is None or self._pos >= self._current.values.shape[1]:
            self._current = None
            self._current = self._next_series()
            self._pos = 0
            self._segment = t_ms
        values = self._current.values[:, self._pos]
        self._pos += 1
        return Sample(
            self.name, t_ms, tuple(float(v) for v in values), Quality.REPLAYED, self._current.label, self._segment
        )

    def recorded_length(self) -> int:
        """Reads one play of the chosen series takes (a bad line is one read), without playing them."""
        return sum(1 if isinstance(item, MalformedError) else item.values.shape[1] for item in self._iterate())

    def samples(self, start_ms: int, count: int | None = None) -> Iterator[Sample]:
        """Play as fast as possible (for imports and tests): samples stamped start_ms + k * period_ms; stops at the
        end of the data (or after `count`) even when looping."""
        k = 0
        loop, self.loop = self.loop, False
        try:
            while count is None or k < count:
                try:
                    yield self.read(start_ms + round(k * self.period_ms))
                except SensorUnavailableError:
                    return
                k += 1
        finally:
            self.loop = loop

    def close(self) -> None:
        self._items = iter(())


def plaid_replay(
    name: str = "plaid",
    *,
    split: Split = "train",
    rate_hz: float = 100.0,
    speed: float = 1.0,
    series: Sequence[int] | None = None,
    classes: Sequence[str] | None = None,
    loop: bool = True,
) -> TsReplaySensor:
    """A replay of PLAID from the installed sktime wheel; labels index PLAID_CLASSES, the channel is "current" in
    amperes, the source "plaid"."""
    return TsReplaySensor(
        name,
        plaid_files(split),
        rate_hz=rate_hz,
        speed=speed,
        channel_names=PLAID_CHANNELS,
        series=series,
        classes=classes,
        class_names=PLAID_CLASSES,
        loop=loop,
        channel_units=PLAID_UNITS,
        source=PLAID_SOURCE,
    )


class CsvReplaySensor:
    """Plays a CSV file row by row. The header names the columns; `t_ms`, `label` and `segment` are special, every
    other column is a channel (a unit may follow in brackets: `power_w[W]`).

    Parameters
    ----------
    name, rate_hz, speed, loop: as for TsReplaySensor; rate_hz None takes the original rate from the `t_ms` column.
    channels: the channel columns to play, in this order (names without units); default every other column.
    class_names: the classes the `label` column names, in label-index order; a label cell is one of these names or
        an index into them. Default: the distinct label names in the file in order of first appearance, or, when
        every label is an integer, no names.
    classes: class names to play; rows of other classes are skipped. Default all.
    source: the kind of sensor that recorded the file (`Sensor.source`); default "replay" (unstated origin).
    """

    blocking = True  # file reads

    def __init__(
        self,
        name: str,
        path: Path,
        *,
        rate_hz: float | None = None,
        speed: float = 1.0,
        loop: bool = True,
        channels: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        source: str = "replay",
    ) -> None:
        self.name = name
        self.source = source
        self.path = Path(path)
        self.loop = loop
        try:
            size = self.path.stat().st_size
        except FileNotFoundError as exc:
            raise SensorUnavailableError("no such CSV file", sensor=name, path=str(path)) from exc
        if size > MAX_CSV_BYTES:
            raise TooLargeError("CSV file exceeds the size limit", path=str(path), limit=MAX_CSV_BYTES, found=size)
        header = self._open()
        if not header or len(header) > MAX_CSV_FIELDS:
            raise MalformedError("CSV header must name 1..65 columns", path=str(path))
        self._t_col, self._label_col, self._segment_col = (
            header.index(k) if k in header else None for k in CSV_KEY_COLUMNS
        )
        by_name = {self._channel(h).name: i for i, h in enumerate(header) if h not in CSV_KEY_COLUMNS}
        if channels is not None:
            unknown = [c for c in channels if c not in by_name]
            if unknown:
                raise ValueError(f"{path}: no column {unknown}; the file has {list(by_name)}")
            self._value_cols = [by_name[c] for c in channels]
        else:
            self._value_cols = list(by_name.values())
        if not self._value_cols:
            raise MalformedError("CSV has no value columns", path=str(path))
        self.channels = tuple(self._channel(header[i]) for i in self._value_cols)
        self._width = len(header)
        self.class_names = tuple(class_names) if class_names is not None else self._label_names()
        self._wanted_labels = _wanted_classes(classes, self.class_names)
        if rate_hz is None:
            rate_hz = self._original_rate()
        if rate_hz <= 0 or speed <= 0:
            raise ValueError("rate_hz and speed must be positive")
        self.period_ms = 1000.0 / (rate_hz * speed)
        self._open()

    @staticmethod
    def _channel(column: str) -> ChannelSpec:
        name, _, unit = column.partition("[")
        return ChannelSpec(name.strip(), unit.rstrip("]").strip())

    def _open(self) -> list[str]:
        handle = self.path.open(newline="", encoding="utf-8")
        self._handle: io.TextIOBase = handle
        self._reader = csv.reader(handle)
        self._line = 1
        return [h.strip() for h in next(self._reader, [])]

    def _label_names(self) -> tuple[str, ...]:
        """The class names the label column uses, in order of first appearance; () when it holds only integers
        (indexes without names) or there is no label column. One pass over the file, at start."""
        if self._label_col is None:
            return ()
        seen: dict[str, None] = {}
        for row in self._reader:
            if len(row) == self._width and row[self._label_col].strip():
                seen.setdefault(row[self._label_col].strip(), None)
        self._open()
        if all(_is_int(label) for label in seen):
            return ()
        return tuple(seen)

    def _original_rate(self) -> float:
        if self._t_col is None:
            raise ValueError(f"{self.path}: no t_ms column, so rate_hz must be given")
        times: list[int] = []
        for row in self._reader:
            try:
                times.append(int(row[self._t_col]))
            except (ValueError, IndexError):
                continue
            if len(times) > 10_000:
                break
        steps = [b - a for a, b in itertools.pairwise(times) if b > a]
        if not steps:
            raise MalformedError("cannot derive the original rate from t_ms", path=str(self.path))
        return 1000.0 / statistics.median(steps)

    def _next_row(self) -> list[str]:
        row = next(self._reader, None)
        self._line += 1
        if row is None:
            if not self.loop:
                raise ReplayEndedError("CSV replay reached the end", sensor=self.name)
            self._handle.close()
            self._open()
            row = next(self._reader, None)
            self._line += 1
            if row is None:
                raise SensorUnavailableError("CSV file has no data rows", sensor=self.name)
        return row

    def recorded_length(self) -> int:
        """Reads one play of the file takes (rows of the chosen classes; a bad row is one read), without playing it."""
        with self.path.open(newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            next(rows, None)
            if self._wanted_labels is None or self._label_col is None:
                return sum(1 for _ in rows)
            wanted = {self.class_names[i] if self.class_names else str(i) for i in self._wanted_labels}
            return sum(1 for row in rows if len(row) != self._width or row[self._label_col].strip() in wanted)

    def _label(self, cell: str) -> int | None:
        text = cell.strip()
        if not text:
            return None
        if text in self.class_names:
            return self.class_names.index(text)
        if _is_int(text) and (not self.class_names or 0 <= int(text) < len(self.class_names)):
            return int(text)
        raise MalformedError("CSV label is not one of the classes", path=str(self.path), line=self._line)

    def read(self, t_ms: int) -> Sample:
        while True:
            row = self._next_row()
            if len(row) != self._width:
                raise MalformedError(
                    "CSV line has the wrong number of fields",
                    path=str(self.path),
                    line=self._line,
                    expected=self._width,
                    found=len(row),
                )
            label = self._label(row[self._label_col]) if self._label_col is not None else None
            if self._wanted_labels is None or label in self._wanted_labels:
                break
        try:
            values = tuple(float(row[i]) for i in self._value_cols)
            segment = int(row[self._segment_col]) if self._segment_col is not None and row[self._segment_col] else None
        except ValueError as exc:
            raise MalformedError(
                "CSV value is not a number", path=str(self.path), line=self._line, detail=str(exc)[:80]
            ) from exc
        if any(math.isinf(v) for v in values):
            raise MalformedError("CSV value is infinite", path=str(self.path), line=self._line)
        return Sample(self.name, t_ms, values, Quality.REPLAYED, label, segment)

    def close(self) -> None:
        self._handle.close()


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def plaid_class_counts(split: Split = "train") -> dict[str, int]:
    """Per-class series counts straight from the files' own labels (the reference the window tests compare to)."""
    counts = np.zeros(len(PLAID_CLASSES), np.int64)
    for path in plaid_files(split):
        _, items = iter_ts(path)
        for item in items:
            if isinstance(item, MalformedError):
                raise item
            if item.label is not None:
                counts[item.label] += 1
    return {n: int(c) for n, c in zip(PLAID_CLASSES, counts, strict=True)}
