"""Reader for the UCR/UEA `.ts` time-series format (as written by sktime/aeon and timeseriesclassification.com).

Layout: `#` comment lines, `@key value` header lines, `@data`, then one series per line: the dimensions separated by
`:`, the values of one dimension separated by `,`, and the class label as the last `:` field when `@classLabel true`.
Series may differ in length (`@equalLength false`), as PLAID's do. Each data line is parsed on its own, so a reader
can report a bad line with its number and go on with the next one (the replay sensor does); `read_ts` is strict.
Files with `@timeStamps true` use a different value syntax and are rejected rather than misread.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.sensors.errors import MalformedError, TooLargeError

MAX_TS_BYTES = 256 * 1024 * 1024
MAX_LINE_CHARS = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TsHeader:
    problem: str
    dims: int
    class_labels: tuple[str, ...]  # empty when the file has no labels
    data_line: int  # 1-based number of the `@data` line

    @property
    def labelled(self) -> bool:
        return bool(self.class_labels)


@dataclass(frozen=True, slots=True)
class TsSeries:
    """One series: values shaped (dims, length) as float32, and its label index into the header's class labels."""

    line: int
    values: np.ndarray
    label: int | None


@dataclass(frozen=True, slots=True)
class TsDataset:
    header: TsHeader
    series: list[TsSeries]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label if s.label is not None else -1 for s in self.series], dtype=np.int64)


def _check_size(path: Path, max_bytes: int) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise MalformedError("no such .ts file", path=str(path)) from exc
    if size > max_bytes:
        raise TooLargeError(".ts file exceeds the size limit", path=str(path), limit=max_bytes, found=size)


def parse_header(lines: Iterator[tuple[int, str]], source: str) -> TsHeader:
    """Consume comment and header lines up to and including `@data`. Requires a univariate or multivariate file
    without timestamps; an absent `@data` line means the file is truncated or not a .ts file."""
    fields: dict[str, str] = {}
    for number, raw in lines:
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        if not line.startswith("@"):
            raise MalformedError("data before @data", source=source, line=number)
        key, _, value = line[1:].partition(" ")
        key = key.lower()
        if key == "data":
            return _header_from_fields(fields, source, number)
        fields[key] = value.strip()
    raise MalformedError(".ts file ends before @data (truncated?)", source=source)


def _header_from_fields(fields: dict[str, str], source: str, data_line: int) -> TsHeader:
    if fields.get("timestamps", "false").lower() == "true":
        raise MalformedError("@timeStamps true is not supported", source=source)
    dims = 1
    if fields.get("univariate", "true").lower() == "false":
        try:
            dims = int(fields.get("dimensions", fields.get("dimension", "")))
        except ValueError as exc:
            raise MalformedError("multivariate .ts file without a valid @dimensions", source=source) from exc
    labels: tuple[str, ...] = ()
    class_label = fields.get("classlabel", "false").split()
    if class_label and class_label[0].lower() == "true":
        labels = tuple(class_label[1:])
        if not labels:
            raise MalformedError("@classLabel true without class values", source=source)
    return TsHeader(fields.get("problemname", ""), dims, labels, data_line)


def parse_series(line: str, header: TsHeader, number: int, source: str) -> TsSeries:
    """One data line to a series. Requires the header the line belongs to."""
    if len(line) > MAX_LINE_CHARS:
        raise TooLargeError(".ts line exceeds the length limit", source=source, line=number, limit=MAX_LINE_CHARS)
    parts = line.strip().split(":")
    expected = header.dims + (1 if header.labelled else 0)
    if len(parts) != expected:
        raise MalformedError(
            ".ts line has the wrong number of ':' fields (truncated?)",
            source=source,
            line=number,
            expected=expected,
            found=len(parts),
        )
    label: int | None = None
    if header.labelled:
        try:
            label = header.class_labels.index(parts[-1].strip())
        except ValueError as exc:
            raise MalformedError(
                "class label not declared in @classLabel", source=source, line=number, found=parts[-1][:32]
            ) from exc
    dims: list[np.ndarray] = []
    for dim in parts[: header.dims]:
        try:
            values = [math.nan if v.strip() == "?" else float(v) for v in dim.split(",")]
        except ValueError as exc:
            raise MalformedError("value is not a number", source=source, line=number, detail=str(exc)[:80]) from exc
        dims.append(np.asarray(values, dtype=np.float32))
    if len({d.size for d in dims}) != 1:
        raise MalformedError("dimensions of one series differ in length", source=source, line=number)
    return TsSeries(number, np.stack(dims), label)


def iter_ts(path: Path, max_bytes: int = MAX_TS_BYTES) -> tuple[TsHeader, Iterator[TsSeries | MalformedError]]:
    """The header and a lazy iterator over series; a bad line yields its error instead of ending the iteration."""
    _check_size(path, max_bytes)
    handle = path.open(encoding="utf-8", errors="strict")
    numbered = enumerate(handle, start=1)
    try:
        header = parse_header(numbered, str(path))
    except Exception:
        handle.close()
        raise

    def series() -> Iterator[TsSeries | MalformedError]:
        with handle:
            for number, line in numbered:
                if not line.strip():
                    continue
                try:
                    yield parse_series(line, header, number, str(path))
                except MalformedError as exc:
                    yield exc

    return header, series()


def read_ts(path: Path, max_bytes: int = MAX_TS_BYTES) -> TsDataset:
    """The whole file; raises on the first bad line (a data set with a hole is not the data set)."""
    header, items = iter_ts(path, max_bytes)
    series: list[TsSeries] = []
    for item in items:
        if isinstance(item, MalformedError):
            raise item
        series.append(item)
    return TsDataset(header, series)
