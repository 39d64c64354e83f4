"""SampleStore on real SQLite files: batches, rejection of bad batches, retention, windows and the fingerprint."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import vectors_dir

from edge.sensors.errors import MalformedError, StoreNotReadyError
from edge.sensors.fingerprint import dataset_fingerprint, window_hash
from edge.sensors.sample import ChannelSpec, Sample
from edge.sensors.store import Retention, SampleStore
from edge.sensors.windows import WindowSpec
from protocol.merkle import merkle_root

ENV = (ChannelSpec("temperature_c", "°C"), ChannelSpec("humidity_pct", "%RH"))


def env_samples(n: int, start: int = 0, step: int = 1000, **kw: object) -> list[Sample]:
    return [Sample("env", start + k * step, (float(k), float(1000 + k)), **kw) for k in range(n)]  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> SampleStore:
    s = SampleStore(tmp_path / "device.db")
    s.register("env", ENV)
    return s


def test_written_samples_read_back_after_reopen(tmp_path: Path, store: SampleStore) -> None:
    assert store.write(env_samples(10)) == 10
    store.close()
    with SampleStore(tmp_path / "device.db") as again:
        assert again.count() == 10
        assert again.channels("env") == ENV
        newest = again.latest("env", 2)
        assert [s.values for s in newest] == [(9.0, 1009.0), (8.0, 1008.0)]
        stats = again.stats()
        assert stats.samples == 10 and stats.sensors[0].first_t_ms == 0 and stats.sensors[0].last_t_ms == 9000


def test_a_bad_batch_changes_nothing(store: SampleStore) -> None:
    store.write(env_samples(3))
    with pytest.raises(MalformedError) as unknown:
        store.write([*env_samples(2, start=10_000), Sample("ghost", 1, (1.0,))])
    assert unknown.value.details["sensor"] == "ghost"
    with pytest.raises(MalformedError) as width:
        store.write([*env_samples(2, start=10_000), Sample("env", 1, (1.0, 2.0, 3.0))])
    assert width.value.details == {"sensor": "env", "expected": 2, "found": 3}
    assert store.count() == 3


def test_the_store_is_wal(store: SampleStore) -> None:
    store.write(env_samples(1))
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_retention_by_count_drops_oldest_first(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "d.db", retention=Retention(max_samples=250)) as s:
        s.register("env", ENV)
        for batch in range(10):
            s.write(env_samples(100, start=batch * 100_000))
        assert s.count() == 250
        times = [x.t_ms for x in s.latest("env", 1000)]
        assert times[0] == 9 * 100_000 + 99_000  # the newest is kept
        assert min(times) == 9 * 100_000 - 150 * 1000  # exactly the 250 most recent remain


def test_retention_by_age_is_measured_from_the_newest_sample(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "d.db", retention=Retention(max_age_ms=30_000)) as s:
        s.register("env", ENV)
        s.write(env_samples(100))  # t = 0 .. 99 s
        times = sorted(x.t_ms for x in s.latest("env", 1000))
        assert times == list(range(69_000, 100_000, 1000))
        # A device that was off for a year keeps its data: age counts back from the newest sample.
        s.write(env_samples(1, start=400 * 86_400_000))
        assert [x.t_ms for x in s.latest("env", 1000)] == [400 * 86_400_000]


def test_retention_by_size_keeps_the_store_under_the_limit(tmp_path: Path) -> None:
    limit = 600 * 1024
    with SampleStore(tmp_path / "d.db", retention=Retention(max_bytes=limit)) as s:
        s.register("env", ENV)
        for batch in range(40):
            s.write(env_samples(1000, start=batch * 10_000_000))
            assert s.stats().used_bytes <= limit
        newest = s.latest("env", 1)[0]
        assert newest.t_ms == 39 * 10_000_000 + 999_000
        assert 0 < s.count() < 40_000


def test_retention_never_deletes_the_newest_sample(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "d.db", retention=Retention(max_samples=0, max_bytes=1)) as s:
        s.register("env", ENV)
        s.write(env_samples(50))
        assert [x.t_ms for x in s.latest("env", 10)] == [49_000]


def test_sliding_windows_break_at_errors_labels_and_gaps(store: SampleStore) -> None:
    samples = env_samples(10)  # t = 0..9 s, label None
    samples[4] = Sample.failed("env", 4000, 2, "I2C NACK")
    store.write(samples)
    windows = store.windows(WindowSpec("env", ("humidity_pct", "temperature_c"), 2))
    # Runs: 0-3 (windows 0-1, 2-3) and 5-9 (5-6, 7-8); the failed sample at 4 is never inside a window.
    assert windows.t_start_ms.tolist() == [0, 2000, 5000, 7000]
    assert windows.X.shape == (4, 2, 2) and windows.X.dtype == np.float32
    np.testing.assert_array_equal(windows.X[2], [[1005.0, 1006.0], [5.0, 6.0]])  # features in the spec's order
    assert windows.y.tolist() == [-1] * 4

    overlapping = store.windows(WindowSpec("env", ("temperature_c",), 3, stride=1))
    assert overlapping.t_start_ms.tolist() == [0, 1000, 5000, 6000, 7000]

    store.write(env_samples(4, start=100_000))  # 91 s later than the last sample
    gapped = store.windows(WindowSpec("env", ("temperature_c",), 3, stride=1, max_gap_ms=1500, since_ms=5000))
    assert gapped.t_start_ms.tolist() == [5000, 6000, 7000, 100_000, 101_000]


def test_labelled_windows_never_mix_labels(store: SampleStore) -> None:
    store.write(env_samples(5, label=1) + env_samples(5, start=5000, label=2) + env_samples(3, start=10_000))
    windows = store.windows(WindowSpec("env", ("temperature_c",), 2, labelled=True))
    assert windows.y.tolist() == [1, 1, 2, 2]
    assert windows.t_start_ms.tolist() == [0, 2000, 5000, 7000]


def test_segment_windows_resample_each_recording(store: SampleStore) -> None:
    rec_a = [Sample("env", k, (float(k), 0.0), label=3, segment=0) for k in range(5)]  # 0,1,2,3,4
    rec_b = [Sample("env", 10 + k, (float(2 * k), 0.0), label=4, segment=10) for k in range(3)]  # 0,2,4
    store.write(rec_a + rec_b)
    windows = store.windows(WindowSpec("env", ("temperature_c",), 9, mode="segment", labelled=True))
    assert windows.y.tolist() == [3, 4]
    np.testing.assert_allclose(windows.X[0, 0], np.linspace(0, 4, 9))
    np.testing.assert_allclose(windows.X[1, 0], np.linspace(0, 4, 9))


def test_iter_windows_streams_in_bounded_batches(store: SampleStore) -> None:
    store.write(env_samples(10_000))
    sizes = [len(b) for b in store.iter_windows(WindowSpec("env", ("temperature_c",), 10), batch=64)]
    assert sum(sizes) == 1000 and max(sizes) == 64
    assert len(store.windows(WindowSpec("env", ("temperature_c",), 10), limit=7)) == 7


def test_windows_read_while_the_store_is_being_written(store: SampleStore) -> None:
    store.write(env_samples(100))
    spec = WindowSpec("env", ("temperature_c",), 10)
    reading = store.iter_windows(spec, batch=1)
    first = next(reading)
    store.write(env_samples(100, start=1_000_000))  # the writer is not blocked by the open read
    assert first.t_start_ms.tolist() == [0]
    assert len(store.windows(spec)) == 20


def test_unknown_features_are_refused(store: SampleStore) -> None:
    store.write(env_samples(3))
    with pytest.raises(MalformedError):
        store.windows(WindowSpec("env", ("co2_ppm",), 2))


def test_window_hash_commits_to_values_time_and_label() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = window_hash(1000, 2, x)
    assert base == window_hash(1000, 2, x.astype(np.float64))  # hashed as float32 whatever the array dtype
    assert base != window_hash(1001, 2, x)
    assert base != window_hash(1000, 3, x)
    y = x.copy()
    y[1, 2] = np.nextafter(y[1, 2], np.float32(10))
    assert base != window_hash(1000, 2, y)
    assert base != window_hash(1000, 2, x.reshape(3, 2))


def _rfc9162_root(leaves: list[bytes]) -> bytes:
    """RFC 9162 §2.1.1 written as the RFC states it (split at the largest power of two below n)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << (len(leaves) - 1).bit_length() - 1
    return hashlib.sha256(b"\x01" + _rfc9162_root(leaves[:k]) + _rfc9162_root(leaves[k:])).digest()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 8, 9, 31, 64, 100])
def test_merkle_root_is_the_rfc_9162_tree_hash(n: int) -> None:
    leaves = [hashlib.sha256(str(i).encode()).digest() for i in range(n)]
    assert merkle_root(leaves) == _rfc9162_root(leaves)


# The leaf inputs of transparency-dev/merkle's test tree (testonly/constants.go, LeafInputs), whose roots the
# public consistency vectors name.
TEST_TREE_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                               "606162636465666768696a6b6c6d6e6f")]  # fmt: skip


@pytest.mark.vectors
def test_merkle_root_matches_the_public_vectors() -> None:
    checked = 0
    for path in sorted(vectors_dir("merkle").glob("consistency/[0-9]*/happy-path.json")):
        case = json.loads(path.read_text())
        for size, root in ((case["size1"], case["root1"]), (case["size2"], case["root2"])):
            assert merkle_root(TEST_TREE_LEAVES[:size]) == base64.b64decode(root), (path, size)
            checked += 1
    assert checked >= 8


def test_fingerprint_names_exactly_the_windows_used(store: SampleStore) -> None:
    store.write(env_samples(100))
    windows = store.windows(WindowSpec("env", ("temperature_c",), 10))
    fp = windows.fingerprint()
    assert fp == dataset_fingerprint([bytes(h) for h in windows.hashes])
    assert windows.subset([1, 0, *range(2, 10)]).fingerprint() != fp  # order is part of what was used
    assert windows.subset(range(9)).fingerprint() != fp  # so is every window
    again = store.windows(WindowSpec("env", ("temperature_c",), 10))
    assert again.fingerprint() == fp  # and reading the same store again gives the same commitment
    assert not math.isnan(float(windows.X.sum()))


def test_a_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are a member's notes, not SQLite\n" * 100)
    before = path.read_bytes()
    with pytest.raises(MalformedError) as err:
        SampleStore(path)
    assert err.value.details["path"] == str(path)
    assert path.read_bytes() == before


def test_a_store_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    SampleStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    db.commit()
    db.close()
    with pytest.raises(MalformedError) as err:
        SampleStore(path)
    assert err.value.details["found"] == "99"


def test_a_reader_of_a_store_still_being_created_is_told_so_not_that_it_is_damaged(tmp_path: Path) -> None:
    """`agent status` may look while `agent run` has created the file and not yet its schema; the schema and its
    version are then written in one transaction, so a reader never sees tables without the version row."""
    path = tmp_path / "samples.db"
    sqlite3.connect(path).close()  # the file exists, empty: what a writer's connect leaves before its first commit
    with pytest.raises(StoreNotReadyError):
        SampleStore(path, readonly=True)
    with SampleStore(path):
        pass
    with SampleStore(path, readonly=True) as store:
        assert store.health() == []
