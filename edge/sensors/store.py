"""`SampleStore`: the device's durable local store of sensor samples, one SQLite file (WAL) per device.

Why this shape:
- One row per reading of one sensor; the channel values are one little-endian float32 blob in the sensor's channel
  order, so multi-channel windows are aligned by construction and a row costs ~60 bytes. A failed reading keeps
  its error text (truncated) next to its ERROR flag.
- Writes are batched: one transaction per `write()` call. WAL with synchronous=NORMAL: a process crash (SIGKILL)
  loses no committed batch and the file reopens clean; only power loss can drop the last batches (never corrupt).
  Samples are not money, so the fsync per commit that the ledger pays is not paid here.
- Rows are only ever deleted as a prefix of ids (retention drops the oldest first and never the newest), so the
  row count is max(id) - min(id) + 1 without a table scan.
- Window reads use their own read-only connection and stream rows with fetchmany, so training reads the store while
  the sampler keeps writing, and memory grows with the windows returned, never with the store.
"""

from __future__ import annotations

import json
import math
import sqlite3
import struct
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.sensors.errors import MalformedError
from edge.sensors.plaid import resample
from edge.sensors.sample import ChannelSpec, Quality, Sample
from edge.sensors.windows import Windows, WindowSpec

SCHEMA_VERSION = "1"
MAX_CHANNELS = 64
MAX_ERROR_CHARS = 240
_BAD = Quality.ERROR | Quality.PARTIAL
_READ_CHUNK = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sensors(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    channels TEXT NOT NULL,
    UNIQUE(name, channels)
);
CREATE TABLE IF NOT EXISTS samples(
    id INTEGER PRIMARY KEY,
    sensor_id INTEGER NOT NULL REFERENCES sensors(id),
    t_ms INTEGER NOT NULL,
    quality INTEGER NOT NULL,
    label INTEGER,
    segment INTEGER,
    value BLOB NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS samples_by_sensor ON samples(sensor_id, id);
"""


# (sensor_id, t_ms, quality, label, segment, packed float32 values, error text)
EncodedSample = tuple[int, int, int, int | None, int | None, bytes, str | None]


@dataclass(frozen=True, slots=True)
class Retention:
    """Retention limits; None means unlimited. Age is measured back from the newest stored sample, so a device
    that was off for a month does not wake up to an empty store."""

    max_age_ms: int | None = None
    max_samples: int | None = None
    max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class SensorStats:
    name: str
    channels: tuple[ChannelSpec, ...]
    samples: int
    errors: int
    labelled: int
    first_t_ms: int | None
    last_t_ms: int | None


@dataclass(frozen=True, slots=True)
class StoreStats:
    path: str
    samples: int
    used_bytes: int
    file_bytes: int
    sensors: tuple[SensorStats, ...]


@dataclass(frozen=True, slots=True)
class _SensorRow:
    id: int
    name: str
    channels: tuple[ChannelSpec, ...]
    pack: struct.Struct


def _encode_channels(channels: Sequence[ChannelSpec]) -> str:
    return json.dumps([[c.name, c.unit] for c in channels], separators=(",", ":"))


def _decode_channels(text: str) -> tuple[ChannelSpec, ...]:
    return tuple(ChannelSpec(n, u) for n, u in json.loads(text))


class SampleStore:
    """A device's sample store. Thread-safe for one writer thread plus any number of window readers.

    Use as a context manager or call `close()`. `write()` commits one batch; `append()`/`flush()` batch for callers
    that produce one sample at a time; `windows()`/`iter_windows()` cut training windows; `stats()` summarises.
    """

    def __init__(self, path: Path | str, *, retention: Retention | None = None, batch_size: int = 5000) -> None:
        self.path = Path(path)
        self.retention = retention or Retention()
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._buffer: list[EncodedSample] = []
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)", (SCHEMA_VERSION,))
            found = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise MalformedError("not a sample store (SQLite refused it)", path=str(self.path), error=str(exc)) from exc
        if found != SCHEMA_VERSION:
            self._db.close()
            raise MalformedError("sample store has an unknown schema", path=str(self.path), found=found)
        self._sensors: dict[str, _SensorRow] = {}
        for sid, name, channels in self._db.execute("SELECT id, name, channels FROM sensors ORDER BY id"):
            specs = _decode_channels(channels)
            self._sensors[name] = _SensorRow(sid, name, specs, struct.Struct(f"<{len(specs)}f"))

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._buffer:
                self._write_locked(self._buffer)
                self._buffer = []
            self._db.close()

    # -- writing -------------------------------------------------------------------------------------------------

    def register(self, sensor: str, channels: Sequence[ChannelSpec]) -> None:
        """Declare a sensor's channels before writing its samples. Idempotent; a changed channel list starts a new
        version of the sensor (older rows keep their own channel list)."""
        if not sensor or not channels or len(channels) > MAX_CHANNELS:
            raise MalformedError("sensor needs a name and 1..64 channels", sensor=sensor, channels=len(channels))
        text = _encode_channels(channels)
        with self._lock:
            known = self._sensors.get(sensor)
            if known and _encode_channels(known.channels) == text:
                return
            self._db.execute("INSERT OR IGNORE INTO sensors(name, channels) VALUES(?, ?)", (sensor, text))
            sid = self._db.execute("SELECT id FROM sensors WHERE name=? AND channels=?", (sensor, text)).fetchone()[0]
            self._sensors[sensor] = _SensorRow(sid, sensor, tuple(channels), struct.Struct(f"<{len(channels)}f"))

    def channels(self, sensor: str) -> tuple[ChannelSpec, ...]:
        row = self._sensors.get(sensor)
        if row is None:
            raise MalformedError("unknown sensor", sensor=sensor)
        return row.channels

    def write(self, samples: Sequence[Sample]) -> int:
        """Commit `samples` as one transaction and apply retention; returns the number written. A sample of an
        unregistered sensor or with the wrong number of values rejects the whole batch before anything is written."""
        rows = [self.encode(s) for s in samples]
        return self.write_encoded(rows)

    def encode(self, sample: Sample) -> EncodedSample:
        """Validate and pack one sample into its row. The scheduler encodes on its event loop as samples arrive, so
        the writer thread only runs SQLite (which releases the GIL) and never holds the loop up for a whole batch
        of Python work (measured: p99 tick lateness 12.6 ms -> under 3 ms at 1,000 samples/s)."""
        row = self._sensors.get(sample.sensor)
        if row is None:
            raise MalformedError("sample of an unregistered sensor", sensor=sample.sensor)
        if len(sample.values) != len(row.channels):
            raise MalformedError(
                "sample has the wrong number of values",
                sensor=sample.sensor,
                expected=len(row.channels),
                found=len(sample.values),
            )
        error = sample.error[:MAX_ERROR_CHARS] if sample.error else None
        return (
            row.id,
            sample.t_ms,
            int(sample.quality),
            sample.label,
            sample.segment,
            row.pack.pack(*sample.values),
            error,
        )

    def write_encoded(self, rows: Sequence[EncodedSample]) -> int:
        """Commit rows made by `encode` as one transaction and apply retention; returns the number written."""
        if not rows:
            return 0
        with self._lock:
            return self._write_locked(rows)

    def append(self, sample: Sample) -> None:
        """Buffer one sample; commits when `batch_size` samples are buffered."""
        self._buffer.append(self.encode(sample))
        if len(self._buffer) >= self.batch_size:
            self.flush()

    def flush(self) -> int:
        with self._lock:
            batch, self._buffer = self._buffer, []
            return self._write_locked(batch) if batch else 0

    def _write_locked(self, rows: Sequence[EncodedSample]) -> int:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT INTO samples(sensor_id, t_ms, quality, label, segment, value, error)"
                " VALUES(?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._enforce_retention_locked()
        return len(rows)

    # -- retention -----------------------------------------------------------------------------------------------

    def enforce_retention(self) -> int:
        """Apply the retention limits now; returns rows deleted."""
        with self._lock:
            return self._enforce_retention_locked()

    def _id_range(self) -> tuple[int, int] | None:
        lo, hi = self._db.execute("SELECT min(id), max(id) FROM samples").fetchone()
        return None if lo is None else (int(lo), int(hi))

    def _delete_before(self, cut: int) -> int:
        """Delete rows with id < cut, never the newest row."""
        bounds = self._id_range()
        if bounds is None:
            return 0
        cut = min(cut, bounds[1])
        if cut <= bounds[0]:
            return 0
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM samples WHERE id < ?", (cut,))
        self._db.execute("COMMIT")
        return cut - bounds[0]

    def _enforce_retention_locked(self) -> int:
        r = self.retention
        deleted = 0
        if r.max_age_ms is not None:
            newest = self._db.execute("SELECT t_ms FROM samples ORDER BY id DESC LIMIT 1").fetchone()
            if newest is not None:
                cutoff = int(newest[0]) - r.max_age_ms
                # Rows are time-ordered by id in practice, so this scan stops right after the expired prefix.
                first = self._db.execute("SELECT id FROM samples WHERE t_ms >= ? ORDER BY id LIMIT 1", (cutoff,))
                found = first.fetchone()
                if found is not None:
                    deleted += self._delete_before(int(found[0]))
        if r.max_samples is not None:
            bounds = self._id_range()
            if bounds and bounds[1] - bounds[0] + 1 > r.max_samples:
                deleted += self._delete_before(bounds[1] - max(r.max_samples, 1) + 1)
        if r.max_bytes is not None:
            deleted += self._shrink_to_bytes_locked(r.max_bytes)
        return deleted

    def _used_bytes(self) -> int:
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def _shrink_to_bytes_locked(self, max_bytes: int) -> int:
        deleted = 0
        for _ in range(8):
            used = self._used_bytes()
            bounds = self._id_range()
            if used <= max_bytes or bounds is None:
                break
            rows = bounds[1] - bounds[0] + 1
            # Aim below the limit so that retention does not run on every batch once the store is full.
            excess = math.ceil(rows * (1.0 - 0.9 * max_bytes / used))
            gone = self._delete_before(bounds[0] + max(excess, 1))
            if gone == 0:
                break
            deleted += gone
        return deleted

    # -- reading -------------------------------------------------------------------------------------------------

    def count(self) -> int:
        with self._lock:
            bounds = self._id_range()
        return 0 if bounds is None else bounds[1] - bounds[0] + 1

    def latest(self, sensor: str, n: int = 1) -> list[Sample]:
        """The newest `n` samples of a sensor, newest first."""
        row = self._sensors.get(sensor)
        if row is None:
            return []
        with self._lock:
            found = self._db.execute(
                "SELECT t_ms, quality, label, segment, value, error FROM samples WHERE sensor_id=?"
                " ORDER BY id DESC LIMIT ?",
                (row.id, n),
            ).fetchall()
        return [
            Sample(sensor, t, tuple(float(v) for v in np.frombuffer(blob, "<f4")), Quality(q), lab, seg, err)
            for t, q, lab, seg, blob, err in found
        ]

    def stats(self) -> StoreStats:
        with self._lock:
            sensors = []
            for sid, name, channels in self._db.execute(
                "SELECT id, name, channels FROM sensors ORDER BY id"
            ).fetchall():
                n, errors, labelled, first, last = self._db.execute(
                    "SELECT count(*), coalesce(sum(quality & 1 != 0), 0), count(label), min(t_ms), max(t_ms)"
                    " FROM samples WHERE sensor_id=?",
                    (sid,),
                ).fetchone()
                sensors.append(SensorStats(name, _decode_channels(channels), n, errors, labelled, first, last))
            bounds = self._id_range()
            used = self._used_bytes()
        file_bytes = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        total = 0 if bounds is None else bounds[1] - bounds[0] + 1
        return StoreStats(str(self.path), total, used, file_bytes, tuple(sensors))

    def _reader(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def windows(self, spec: WindowSpec, limit: int | None = None) -> Windows:
        """All windows of `spec` (at most `limit`) as arrays; see `iter_windows` for bounded memory."""
        parts: list[Windows] = []
        got = 0
        for part in self.iter_windows(spec):
            parts.append(part)
            got += len(part)
            if limit is not None and got >= limit:
                break
        out = Windows.concat(parts, len(spec.features), spec.length)
        return out if limit is None else out.subset(np.arange(min(limit, len(out))))

    def iter_windows(self, spec: WindowSpec, batch: int = 1024) -> Iterator[Windows]:
        """Windows of `spec` in store order, `batch` at a time, streaming rows so memory stays bounded.

        Sliding mode: a run of consecutive samples of one segment and one label without errors (and without gaps
        larger than `max_gap_ms`) is cut every `stride` samples into windows of `length`. Segment mode: each
        segment (one recording) whose samples are all good becomes one window, resampled to `length`; labelled
        windows need every sample of the window to carry the same label."""
        versions = self._versions_with(spec)
        cutter = _WindowCutter(spec)
        reader = self._reader()
        try:
            for sid, columns in versions:
                cutter.start_source()
                sql = "SELECT t_ms, quality, label, segment, value FROM samples WHERE sensor_id=?"
                args: list[Any] = [sid]
                if spec.since_ms is not None:
                    sql += " AND t_ms >= ?"
                    args.append(spec.since_ms)
                if spec.until_ms is not None:
                    sql += " AND t_ms < ?"
                    args.append(spec.until_ms)
                cursor = reader.execute(sql + " ORDER BY id", args)
                while rows := cursor.fetchmany(_READ_CHUNK):
                    cutter.feed(rows, columns)
                    while cutter.ready() >= batch:
                        yield cutter.take(batch)
            cutter.finish()
            while cutter.ready():
                yield cutter.take(batch)
        finally:
            reader.close()

    def _versions_with(self, spec: WindowSpec) -> list[tuple[int, np.ndarray]]:
        out: list[tuple[int, np.ndarray]] = []
        with self._lock:
            found = self._db.execute("SELECT id, channels FROM sensors WHERE name=? ORDER BY id", (spec.sensor,))
            for sid, text in found.fetchall():
                names = [c.name for c in _decode_channels(text)]
                if all(f in names for f in spec.features):
                    out.append((sid, np.array([names.index(f) for f in spec.features], dtype=np.int64)))
        if not out:
            raise MalformedError(
                "no sensor in the store has these features", sensor=spec.sensor, features=spec.features
            )
        return out


class _WindowCutter:
    """Turns a stream of rows into windows, holding at most one window's (or one segment's) samples."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self.stride = spec.stride or spec.length
        self._run: deque[np.ndarray] = deque(maxlen=spec.length)
        self._run_t: deque[int] = deque(maxlen=spec.length)
        self._run_n = 0
        self._key: tuple[int | None, int | None] | None = None
        self._last_t: int | None = None
        self._segment: list[np.ndarray] = []
        self._segment_t = 0
        self._segment_ok = True
        self._out_x: list[np.ndarray] = []
        self._out_y: list[int] = []
        self._out_t: list[int] = []

    def start_source(self) -> None:
        self._close_run()

    def feed(self, rows: list[tuple[Any, ...]], columns: np.ndarray) -> None:
        segment_mode = self.spec.mode == "segment"
        for t, quality, label, segment, blob in rows:
            values = np.frombuffer(blob, "<f4")[columns]
            good = not (quality & _BAD) and not np.isnan(values).any()
            key = (segment, label)
            gap = (
                self.spec.max_gap_ms is not None
                and self._last_t is not None
                and t - self._last_t > self.spec.max_gap_ms
            )
            if key != self._key or gap:
                self._close_run()
                self._key = key
                self._segment_t = t
            self._last_t = t
            if segment_mode:
                self._segment_ok = self._segment_ok and good
                self._segment.append(values)
                continue
            if not good:
                self._close_run()
                self._key = key
                continue
            self._run.append(values)
            self._run_t.append(t)
            self._run_n += 1
            if self._run_n >= self.spec.length and (self._run_n - self.spec.length) % self.stride == 0:
                self._emit(np.stack(self._run, axis=1), label, self._run_t[0])

    def _emit(self, window: np.ndarray, label: int | None, t_start: int) -> None:
        if self.spec.labelled and label is None:
            return
        self._out_x.append(window.astype(np.float32, copy=False))
        self._out_y.append(-1 if label is None else int(label))
        self._out_t.append(t_start)

    def _close_run(self) -> None:
        if self.spec.mode == "segment" and self._segment and self._key is not None:
            segment, label = self._key
            if segment is not None and self._segment_ok:
                series = np.stack(self._segment, axis=1)
                window = np.stack([resample(ch, self.spec.length) for ch in series])
                self._emit(window, label, self._segment_t)
        self._segment = []
        self._segment_ok = True
        self._run.clear()
        self._run_t.clear()
        self._run_n = 0
        self._key = None
        self._last_t = None

    def finish(self) -> None:
        self._close_run()

    def ready(self) -> int:
        return len(self._out_x)

    def take(self, n: int) -> Windows:
        xs, self._out_x = self._out_x[:n], self._out_x[n:]
        ys, self._out_y = self._out_y[:n], self._out_y[n:]
        ts, self._out_t = self._out_t[:n], self._out_t[n:]
        return Windows.build(np.stack(xs), np.asarray(ys, np.int64), np.asarray(ts, np.int64))


def write_all(store: SampleStore, samples: Iterable[Sample], batch: int = 5000) -> int:
    """Write an iterable of samples in batches of `batch`; returns the number written."""
    written = 0
    pending: list[Sample] = []
    for s in samples:
        pending.append(s)
        if len(pending) >= batch:
            written += store.write(pending)
            pending = []
    return written + store.write(pending)
