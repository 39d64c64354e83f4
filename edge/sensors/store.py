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
- A labelled sensor's class names are stored with it (a sensor version is its name, channels and class names), so
  windows map labels to a task's classes by name; indexes alone would silently relabel data from another file.
- So is its source, the kind of sensor the data came from (edge.sensors.driver.Sensor.source): a task declares the
  sources and units of its inputs, and data of another origin with the same channel name is refused, not trained
  as if it were the task's (a univariate recording is named "current" whatever it measured).
- The sampler's per-sensor health (rate, last sample, errors by kind) is kept in a small table beside the samples,
  so `midgate agent status`, another process, reads what the daemon sees.
"""

from __future__ import annotations

import json
import math
import sqlite3
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.sensors.errors import MalformedError, MissingInputsError, StoreNotReadyError
from edge.sensors.sample import ChannelSpec, Quality, Sample
from edge.sqlite_cache import bound_page_cache

if TYPE_CHECKING:
    # numpy and the window cutter are imported by the reads that need them, not by the agent that only records
    # samples: 20 MB of an idle agent on a 512 MB board (BENCHMARKS.md, "Raspberry Pi hub").
    import numpy as np

    from edge.sensors.windows import Windows, WindowSpec

SCHEMA_VERSION = "3"
MAX_CHANNELS = 64
MAX_CLASSES = 1000
MAX_ERROR_CHARS = 240
_READ_CHUNK = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sensors(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    channels TEXT NOT NULL,
    classes TEXT NOT NULL DEFAULT '[]',
    source TEXT NOT NULL DEFAULT '',
    UNIQUE(name, channels, classes, source)
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
CREATE TABLE IF NOT EXISTS sensor_health(
    name TEXT PRIMARY KEY,
    driver TEXT NOT NULL,
    state TEXT NOT NULL,
    period_ms REAL NOT NULL,
    samples INTEGER NOT NULL,
    rate_hz REAL NOT NULL,
    last_t_ms INTEGER,
    errors TEXT NOT NULL,
    last_error TEXT,
    updated_ms INTEGER NOT NULL
);
"""

# Schema 1 had no class names: sensor versions were unique by (name, channels). SQLite cannot change a UNIQUE
# constraint in place, so the table is rebuilt (https://sqlite.org/lang_altertable.html#otheralter); ids are kept,
# so every sample keeps its sensor. Old labels get no names: they can no longer train a classification task.
_MIGRATE_FROM_1 = """
CREATE TABLE sensors_v2(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    channels TEXT NOT NULL,
    classes TEXT NOT NULL DEFAULT '[]',
    UNIQUE(name, channels, classes)
);
INSERT INTO sensors_v2(id, name, channels) SELECT id, name, channels FROM sensors;
DROP TABLE sensors;
ALTER TABLE sensors_v2 RENAME TO sensors;
UPDATE meta SET value = '2' WHERE key = 'schema';
"""

# Schema 2 had no sources; the same rebuild widens the UNIQUE constraint. A sensor the daemon last ran as a live
# driver (`sensor_health.driver` simulated, linux or bme280: each has one fixed source) gets that source; the others
# (replays: a PLAID replay and any other univariate file look alike) get '' (unknown), so their data no longer trains
# a task, whose inputs always name their sources, until it is recorded again.
_MIGRATE_FROM_2 = """
CREATE TABLE sensors_v3(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    channels TEXT NOT NULL,
    classes TEXT NOT NULL DEFAULT '[]',
    source TEXT NOT NULL DEFAULT '',
    UNIQUE(name, channels, classes, source)
);
INSERT INTO sensors_v3(id, name, channels, classes) SELECT id, name, channels, classes FROM sensors;
DROP TABLE sensors;
ALTER TABLE sensors_v3 RENAME TO sensors;
UPDATE meta SET value = '3' WHERE key = 'schema';
"""
_LIVE_SOURCES_FROM_HEALTH = """
UPDATE sensors SET source = coalesce((SELECT driver FROM sensor_health h WHERE h.name = sensors.name
    AND h.driver IN ('simulated', 'linux', 'bme280')), '');
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
    classes: tuple[str, ...]
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
class SensorHealth:
    """How sampling one sensor goes, as the daemon last saw it.

    `state`: sampling, loading (a replay played as fast as the store takes it), loaded, finished (a replay that
    played all its data), unavailable (could not be started; `last_error` says why) or stopped (the daemon ended).
    `rate_hz`: samples stored per second over the last interval; `errors`: failed reads by reason code.
    """

    name: str
    driver: str
    state: str
    period_ms: float
    samples: int = 0
    rate_hz: float = 0.0
    last_t_ms: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    updated_ms: int = 0


@dataclass(frozen=True, slots=True)
class _SensorRow:
    id: int
    name: str
    channels: tuple[ChannelSpec, ...]
    classes: tuple[str, ...]
    source: str
    pack: struct.Struct


def _encode_channels(channels: Sequence[ChannelSpec]) -> str:
    return json.dumps([[c.name, c.unit] for c in channels], separators=(",", ":"))


def _decode_channels(text: str) -> tuple[ChannelSpec, ...]:
    return tuple(ChannelSpec(n, u) for n, u in json.loads(text))


def _encode_classes(classes: Sequence[str]) -> str:
    return json.dumps(list(classes), separators=(",", ":"))


def _decode_classes(text: str) -> tuple[str, ...]:
    return tuple(str(c) for c in json.loads(text))


def _label_map(classes: tuple[str, ...], wanted: tuple[str, ...]) -> np.ndarray:
    """Each stored label index's position in `wanted` (by name). Requires set(classes) <= set(wanted)."""
    import numpy as np

    return np.array([wanted.index(c) for c in classes], dtype=np.int64)


class SampleStore:
    """A device's sample store. Thread-safe for one writer thread plus any number of window readers.

    Use as a context manager or call `close()`. `write()` commits one batch; `append()`/`flush()` batch for callers
    that produce one sample at a time; `windows()`/`iter_windows()` cut training windows; `stats()` summarises.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        retention: Retention | None = None,
        batch_size: int = 5000,
        readonly: bool = False,
    ) -> None:
        """`readonly`: read what another process writes (windows, stats, health) without ever writing; the store
        must exist and be of the current schema."""
        self.path = Path(path)
        self.retention = retention or Retention()
        self.batch_size = batch_size
        self.readonly = readonly
        self._lock = threading.Lock()
        self._buffer: list[EncodedSample] = []
        if readonly:
            if not self.path.is_file():
                raise MalformedError("no sample store here", path=str(self.path))
            self._db = self._reader()
        else:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            self._open_schema()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise MalformedError("not a sample store (SQLite refused it)", path=str(self.path), error=str(exc)) from exc
        except MalformedError:
            self._db.close()
            raise
        self._sensors: dict[str, _SensorRow] = {}
        for sid, name, channels, classes, source in self._db.execute(
            "SELECT id, name, channels, classes, source FROM sensors ORDER BY id"
        ):
            specs = _decode_channels(channels)
            self._sensors[name] = _SensorRow(sid, name, specs, _decode_classes(classes), source, _pack(specs))

    def _open_schema(self) -> None:
        """Check the schema version first, then create or upgrade: a file of another version is left as it is."""
        has_meta = self._db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()
        found = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone() if has_meta else None
        version = None if found is None else str(found[0])
        if self.readonly and version is None:
            raise StoreNotReadyError("the sample store is still being created", path=str(self.path))
        if version not in (None, "1", "2", SCHEMA_VERSION) or (self.readonly and version != SCHEMA_VERSION):
            raise MalformedError(
                "sample store has an unknown schema", path=str(self.path), found=version, expected=SCHEMA_VERSION
            )
        if self.readonly:
            return
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        bound_page_cache(self._db)
        if version in ("1", "2"):
            self._db.execute("PRAGMA foreign_keys=OFF")  # the rebuild drops the table samples refer to
            steps = (_MIGRATE_FROM_1 if version == "1" else "") + _MIGRATE_FROM_2
            health = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='sensor_health'"
            if self._db.execute(health).fetchone():
                steps += _LIVE_SOURCES_FROM_HEALTH
            self._db.executescript("BEGIN IMMEDIATE;" + steps + "COMMIT;")
        self._db.execute("PRAGMA foreign_keys=ON")
        # One transaction: a reader (`agent status`) sees no schema or the whole one with its version, never tables
        # without the version row.
        version_row = f"INSERT OR IGNORE INTO meta(key, value) VALUES('schema', '{SCHEMA_VERSION}');"
        self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA};{version_row}COMMIT;")

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

    def register(
        self, sensor: str, channels: Sequence[ChannelSpec], classes: Sequence[str] = (), source: str = ""
    ) -> None:
        """Declare a sensor's channels, the class names its label indexes stand for, and its source (the kind of
        sensor, `Sensor.source`; "" unknown), before writing its samples. Idempotent; a changed channel or class
        list or source starts a new version of the sensor (older rows keep their own)."""
        if not sensor or not channels or len(channels) > MAX_CHANNELS:
            raise MalformedError("sensor needs a name and 1..64 channels", sensor=sensor, channels=len(channels))
        if len(classes) > MAX_CLASSES or len(set(classes)) != len(classes):
            raise MalformedError("class names must be distinct, at most 1000", sensor=sensor, classes=len(classes))
        text, names = _encode_channels(channels), _encode_classes(classes)
        with self._lock:
            known = self._sensors.get(sensor)
            if known and (known.channels, known.classes, known.source) == (tuple(channels), tuple(classes), source):
                return
            row = (sensor, text, names, source)
            self._db.execute("INSERT OR IGNORE INTO sensors(name, channels, classes, source) VALUES(?, ?, ?, ?)", row)
            sid = self._db.execute(
                "SELECT id FROM sensors WHERE name=? AND channels=? AND classes=? AND source=?", row
            ).fetchone()[0]
            self._sensors[sensor] = _SensorRow(sid, sensor, tuple(channels), tuple(classes), source, _pack(channels))

    def channels(self, sensor: str) -> tuple[ChannelSpec, ...]:
        row = self._sensors.get(sensor)
        if row is None:
            raise MalformedError("unknown sensor", sensor=sensor)
        return row.channels

    def classes(self, sensor: str) -> tuple[str, ...]:
        """The class names the current version of `sensor` labels with (empty: none)."""
        row = self._sensors.get(sensor)
        if row is None:
            raise MalformedError("unknown sensor", sensor=sensor)
        return row.classes

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            found = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if found is None else str(found[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    def save_health(self, reports: Sequence[SensorHealth]) -> None:
        """Replace the stored health with `reports` (one transaction): the sensors the daemon runs now, so one taken
        out of agent.toml does not linger in `agent status`."""
        rows = [
            (
                h.name,
                h.driver,
                h.state,
                h.period_ms,
                h.samples,
                h.rate_hz,
                h.last_t_ms,
                json.dumps(h.errors, sort_keys=True),
                h.last_error[:MAX_ERROR_CHARS] if h.last_error else None,
                h.updated_ms,
            )
            for h in reports
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM sensor_health")
                self._db.executemany("INSERT INTO sensor_health VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def health(self) -> list[SensorHealth]:
        """The stored health of every sensor the daemon ran, by name."""
        with self._lock:
            found = self._db.execute(
                "SELECT name, driver, state, period_ms, samples, rate_hz, last_t_ms, errors, last_error, updated_ms"
                " FROM sensor_health ORDER BY name"
            ).fetchall()
        return [
            SensorHealth(n, d, st, float(p), int(c), float(r), t, dict(json.loads(e)), le, int(u))
            for n, d, st, p, c, r, t, e, le, u in found
        ]

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
            Sample(sensor, t, struct.unpack(f"<{len(blob) // 4}f", blob), Quality(q), lab, seg, err)
            for t, q, lab, seg, blob, err in found
        ]

    def stats(self) -> StoreStats:
        with self._lock:
            sensors = []
            for sid, name, channels, classes in self._db.execute(
                "SELECT id, name, channels, classes FROM sensors ORDER BY id"
            ).fetchall():
                n, errors, labelled, first, last = self._db.execute(
                    "SELECT count(*), coalesce(sum(quality & 1 != 0), 0), count(label), min(t_ms), max(t_ms)"
                    " FROM samples WHERE sensor_id=?",
                    (sid,),
                ).fetchone()
                specs, names = _decode_channels(channels), _decode_classes(classes)
                sensors.append(SensorStats(name, specs, names, n, errors, labelled, first, last))
            bounds = self._id_range()
            used = self._used_bytes()
        file_bytes = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        total = 0 if bounds is None else bounds[1] - bounds[0] + 1
        return StoreStats(str(self.path), total, used, file_bytes, tuple(sensors))

    def _reader(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def windows(self, spec: WindowSpec, limit: int | None = None) -> Windows:
        """All windows of `spec` (at most `limit`) as arrays; see `iter_windows` for bounded memory."""
        import numpy as np

        from edge.sensors.windows import Windows

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
        windows need every sample of the window to carry the same label. Raises MissingInputsError when no
        version of the sensor has the features (and, with `spec.classes`, class names among them)."""
        from edge.sensors.windows import WindowCutter

        versions = self._versions_with(spec)
        cutter = WindowCutter(spec)
        reader = self._reader()
        try:
            for sid, columns, labels in versions:
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
                    cutter.feed(rows, columns, labels)
                    while cutter.ready() >= batch:
                        yield cutter.take(batch)
            cutter.finish()
            while cutter.ready():
                yield cutter.take(batch)
        finally:
            reader.close()

    def fitting_sensors(self, inputs: WindowSpec) -> tuple[list[str], dict[str, str]]:
        """The sensors (by name) with a version whose data can make windows of `inputs` (its features, units,
        sources and classes; its sensor is ignored), and for every other sensor why not (see `input_misfit`)."""
        reasons: dict[str, list[str]] = {}
        with self._lock:
            found = self._db.execute("SELECT name, channels, classes, source FROM sensors ORDER BY name, id").fetchall()
        for name, channels, names, source in found:
            why = input_misfit(_decode_channels(channels), _decode_classes(names), source, inputs)
            reasons.setdefault(name, []).append(why)
        fitting = [name for name, why in reasons.items() if "" in why]
        misfits = {name: "; ".join(dict.fromkeys(why)) for name, why in reasons.items() if "" not in why}
        return fitting, misfits

    def _versions_with(self, spec: WindowSpec) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
        """(version id, feature columns, label map) of each version of the sensor that fits `spec`; raises
        MissingInputsError saying, per version, why none does."""
        import numpy as np

        out: list[tuple[int, np.ndarray, np.ndarray | None]] = []
        misfits: list[str] = []
        with self._lock:
            found = self._db.execute(
                "SELECT id, channels, classes, source FROM sensors WHERE name=? ORDER BY id", (spec.sensor,)
            ).fetchall()
        for sid, channels, classes, source in found:
            specs = _decode_channels(channels)
            why = input_misfit(specs, _decode_classes(classes), source, spec)
            if why:
                misfits.append(why)
                continue
            names = [c.name for c in specs]
            columns = np.array([names.index(f) for f in spec.features], dtype=np.int64)
            labels = None if spec.classes is None else _label_map(_decode_classes(classes), spec.classes)
            out.append((sid, columns, labels))
        if not out:
            raise MissingInputsError(
                "the store has no data with the task's inputs",
                sensors={spec.sensor: "; ".join(misfits) or "no such sensor in the store"},
                features=spec.features,
            )
        return out


def input_misfit(channels: Sequence[ChannelSpec], classes: Sequence[str], source: str, spec: WindowSpec) -> str:
    """Why a sensor version's data cannot make `spec`'s windows ("" if it can): a missing feature, a source the spec
    does not take (unknown: ""), a feature in another unit, or labels that do not name `spec.classes`. Labels are
    matched by name: a version without class names, or with names outside the spec's, does not fit."""
    units = {c.name: c.unit for c in channels}
    missing = [f for f in spec.features if f not in units]
    if missing:
        return f"channels {list(units)} lack {missing}"
    if spec.sources is not None and source not in spec.sources:
        return f"source {source or 'unknown'!r} is not one of {list(spec.sources)}"
    if spec.units is not None:
        pairs = zip(spec.features, spec.units, strict=True)
        wrong = [f"{f} in {units[f]!r}, not {u!r}" for f, u in pairs if units[f] != u]
        if wrong:
            return f"units differ: {', '.join(wrong)}"
    if spec.classes is None:
        return ""
    if not classes:
        return "its labels have no class names"
    unknown = [c for c in classes if c not in spec.classes]
    return f"classes {unknown} are not the task's" if unknown else ""


def _pack(channels: Sequence[ChannelSpec]) -> struct.Struct:
    return struct.Struct(f"<{len(channels)}f")


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
