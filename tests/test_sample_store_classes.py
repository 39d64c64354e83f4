"""What the store keeps beside the samples: each sensor's class names (labels are mapped to a task's classes by name,
never relabelled by index), the sampler's per-sensor health, and the upgrade of a schema-1 store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edge.sensors.errors import MalformedError, MissingInputsError
from edge.sensors.sample import ChannelSpec, Sample
from edge.sensors.store import SampleStore, SensorHealth
from edge.sensors.windows import WindowSpec

METER = (ChannelSpec("power_w", "W"),)


def recording(segment: int, label: int, n: int = 4) -> list[Sample]:
    return [Sample("meter", segment + k, (float(label),), label=label, segment=segment) for k in range(n)]


def test_labels_map_to_the_wanted_classes_by_name(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "d.db") as store:
        store.register("meter", METER, ("kettle", "toaster"))
        store.write(recording(0, 0) + recording(100, 1))
        assert store.classes("meter") == ("kettle", "toaster")
        spec = WindowSpec("meter", ("power_w",), 4, mode="segment", labelled=True, classes=("toaster", "fan", "kettle"))
        windows = store.windows(spec)
        assert windows.y.tolist() == [2, 0]  # kettle is index 2 of the wanted classes, toaster 0
        raw = store.windows(WindowSpec("meter", ("power_w",), 4, mode="segment", labelled=True))
        assert raw.y.tolist() == [0, 1]  # without wanted classes: the stored indexes as they are
        # The hash commits to the label the task trains on, so the two cuts are different data sets.
        assert windows.fingerprint() != raw.fingerprint()


def test_data_whose_classes_the_task_lacks_or_that_has_no_names_is_refused(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "d.db") as store:
        store.register("meter", METER, ("kettle", "toaster"))
        store.write(recording(0, 0))
        with pytest.raises(MissingInputsError) as foreign:
            store.windows(WindowSpec("meter", ("power_w",), 4, labelled=True, classes=("kettle", "fan")))
        assert "classes ['toaster'] are not the task's" in foreign.value.details["sensors"]["meter"]
        store.register("bare", METER)
        store.write([Sample("bare", 0, (1.0,), label=0)])
        with pytest.raises(MissingInputsError, match="no class names"):
            store.windows(WindowSpec("bare", ("power_w",), 1, labelled=True, classes=("kettle",)))
        fitting, misfits = store.fitting_sensors(WindowSpec("", ("power_w",), 1, classes=("kettle", "toaster", "fan")))
        assert fitting == ["meter"] and misfits == {"bare": "its labels have no class names"}
        fitting, misfits = store.fitting_sensors(WindowSpec("", ("voltage_v",), 1))
        assert fitting == [] and set(misfits) == {"meter", "bare"} and "lack ['voltage_v']" in misfits["meter"]


def test_a_changed_class_list_is_a_new_version_and_old_rows_keep_theirs(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "d.db") as store:
        store.register("meter", METER, ("kettle", "toaster"))
        store.write(recording(0, 1))  # toaster
        store.register("meter", METER, ("toaster", "kettle"))  # another file, other index order
        store.write(recording(100, 1))  # kettle
        spec = WindowSpec("meter", ("power_w",), 4, mode="segment", labelled=True, classes=("kettle", "toaster"))
        assert store.windows(spec).y.tolist() == [1, 0]
        stats = {(s.name, s.classes): s.samples for s in store.stats().sensors}
        assert stats == {("meter", ("kettle", "toaster")): 4, ("meter", ("toaster", "kettle")): 4}
        with pytest.raises(MalformedError):
            store.register("meter", METER, ("kettle", "kettle"))


def test_health_round_trips_and_a_reader_sees_it_while_the_writer_is_open(tmp_path: Path) -> None:
    reports = [
        SensorHealth("env", "simulated", "sampling", 1000.0, 42, 1.0, 41_000, {"sensor_io": 2}, "dropout", 5),
        SensorHealth("bme", "bme280", "unavailable", 1000.0, last_error="no device at 0x76", updated_ms=5),
    ]
    with SampleStore(tmp_path / "d.db") as store:
        store.save_health(reports)
        with SampleStore(tmp_path / "d.db", readonly=True) as reader:
            assert reader.health() == sorted(reports, key=lambda h: h.name)
        store.save_health(reports[:1])  # the whole table is replaced: a sensor no longer configured goes
        assert store.health() == reports[:1]


def test_readonly_never_creates_or_changes_a_file(tmp_path: Path) -> None:
    with pytest.raises(MalformedError, match="no sample store"):
        SampleStore(tmp_path / "absent.db", readonly=True)
    assert not (tmp_path / "absent.db").exists()
    with SampleStore(tmp_path / "d.db") as store:
        store.register("meter", METER)
    with SampleStore(tmp_path / "d.db", readonly=True) as reader:
        assert reader.channels("meter") == METER
        with pytest.raises(sqlite3.OperationalError):
            reader.set_meta("x", "y")


SCHEMA_1 = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sensors(id INTEGER PRIMARY KEY, name TEXT NOT NULL, channels TEXT NOT NULL, UNIQUE(name, channels));
CREATE TABLE samples(
    id INTEGER PRIMARY KEY, sensor_id INTEGER NOT NULL REFERENCES sensors(id), t_ms INTEGER NOT NULL,
    quality INTEGER NOT NULL, label INTEGER, segment INTEGER, value BLOB NOT NULL, error TEXT
);
CREATE INDEX samples_by_sensor ON samples(sensor_id, id);
INSERT INTO meta VALUES('schema', '1');
INSERT INTO sensors VALUES(7, 'meter', '[["power_w","W"]]');
"""


def test_a_schema_1_store_is_upgraded_in_place_and_keeps_every_sample(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    blob = np.array([3.5], "<f4").tobytes()
    db.executemany("INSERT INTO samples VALUES(NULL, 7, ?, 0, 1, NULL, ?, NULL)", [(t, blob) for t in range(10)])
    db.commit()
    db.close()
    with pytest.raises(MalformedError):  # a reader never upgrades
        SampleStore(path, readonly=True)
    with SampleStore(path) as store:
        assert store.count() == 10 and store.channels("meter") == METER and store.classes("meter") == ()
        assert store.windows(WindowSpec("meter", ("power_w",), 5)).X.shape == (2, 1, 5)
        with pytest.raises(MissingInputsError, match="no class names"):  # old labels have no names: not trainable
            store.windows(WindowSpec("meter", ("power_w",), 5, labelled=True, classes=("kettle",)))
        store.register("meter", METER, ("kettle",))
        store.write([Sample("meter", 100, (1.0,), label=0)])
        assert store.get_meta("schema") == "3"
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA foreign_key_check").fetchall() == []
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()
    with SampleStore(path) as again:
        assert again.count() == 11


def test_a_schema_2_store_gets_sources_only_where_its_driver_proves_them(tmp_path: Path) -> None:
    """Schema 2 kept no sources: a live driver's sensor gets its driver's (one fixed source), a replay's stays
    unknown (a PLAID replay and any univariate file look alike), so old replayed data trains no task until reloaded."""
    path = tmp_path / "v2.db"
    with SampleStore(path) as store:
        store.register("env", (ChannelSpec("temperature_c", "°C"),), source="simulated")
        store.register("plaid", (ChannelSpec("current", "A"),), ("kettle", "toaster"), source="plaid")
        store.write([Sample("env", 0, (20.0,)), Sample("plaid", 0, (1.0,), label=0)])
        store.save_health(
            [SensorHealth("env", "simulated", "sampling", 1000.0), SensorHealth("plaid", "replay", "loaded", 10.0)]
        )
    db = sqlite3.connect(path)  # back to schema 2: the sensors table without its source column
    db.executescript(
        "PRAGMA foreign_keys=OFF; BEGIN;"
        "CREATE TABLE s2(id INTEGER PRIMARY KEY, name TEXT NOT NULL, channels TEXT NOT NULL,"
        " classes TEXT NOT NULL DEFAULT '[]', UNIQUE(name, channels, classes));"
        "INSERT INTO s2 SELECT id, name, channels, classes FROM sensors; DROP TABLE sensors;"
        "ALTER TABLE s2 RENAME TO sensors; UPDATE meta SET value='2' WHERE key='schema'; COMMIT;"
    )
    db.close()
    with SampleStore(path) as store:
        assert store.get_meta("schema") == "3" and store.count() == 2
        sources = ("simulated", "plaid")
        fitting, misfits = store.fitting_sensors(WindowSpec("", ("temperature_c",), 1, sources=sources))
        assert fitting == ["env"]
        fitting, misfits = store.fitting_sensors(WindowSpec("", ("current",), 1, sources=sources))
        assert fitting == [] and misfits["plaid"] == "source 'unknown' is not one of ['simulated', 'plaid']"
