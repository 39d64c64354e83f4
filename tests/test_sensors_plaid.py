"""PLAID read from the installed sktime wheel: the loader and the store's window extraction agree with the data
set's own labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge.sensors.plaid import PLAID_CLASSES, load_plaid, plaid_dir, resample
from edge.sensors.replay import plaid_class_counts, plaid_replay
from edge.sensors.store import SampleStore, write_all
from edge.sensors.tsfile import read_ts
from edge.sensors.windows import WindowSpec


def _labels_in_file(path: Path) -> list[int]:
    """Labels read with nothing but string splitting, as an independent reference for the .ts parser."""
    labels = []
    in_data = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if in_data and line.strip():
            labels.append(int(line.rsplit(":", 1)[1]))
        in_data = in_data or line.strip().lower() == "@data"
    return labels


def test_plaid_is_found_inside_the_installed_package() -> None:
    folder = plaid_dir()
    assert "site-packages" in str(folder) or "dist-packages" in str(folder)
    assert {p.name for p in folder.glob("*.ts")} >= {"PLAID_TRAIN.ts", "PLAID_TEST.ts"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_plaid_gives_fixed_length_windows_with_the_files_labels(split: str) -> None:
    windows = load_plaid(split, length=96)  # type: ignore[arg-type]
    reference = _labels_in_file(plaid_dir() / f"PLAID_{split.upper()}.ts")
    assert len(reference) == 537
    assert windows.X.shape == (537, 96) and windows.X.dtype == np.float32
    assert windows.y.tolist() == reference
    assert windows.class_names == PLAID_CLASSES
    assert np.isfinite(windows.X).all()


def test_resample_keeps_endpoints_and_is_linear() -> None:
    series = np.array([0.0, 10.0, 20.0], dtype=np.float32)
    assert resample(series, 5).tolist() == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert resample(np.array([3.0], dtype=np.float32), 4).tolist() == [3.0] * 4


def test_plaid_series_have_varying_lengths_so_windows_must_be_resampled() -> None:
    lengths = {s.values.shape[1] for s in read_ts(plaid_dir() / "PLAID_TRAIN.ts").series}
    assert min(lengths) == 100 and max(lengths) == 1344


def test_store_windows_from_replayed_plaid_match_the_data_set(tmp_path: Path) -> None:
    sensor = plaid_replay(split="train")
    with SampleStore(tmp_path / "device.db") as store:
        store.register(sensor.name, sensor.channels, sensor.class_names, sensor.source)
        write_all(store, sensor.samples(1_764_000_000_000))
        windows = store.windows(WindowSpec("plaid", ("current",), 128, mode="segment", labelled=True))
    expected = plaid_class_counts("train")
    found = np.bincount(windows.y, minlength=len(PLAID_CLASSES))
    assert dict(zip(PLAID_CLASSES, found.tolist(), strict=True)) == expected
    assert sum(expected.values()) == 537
    # One window per recording, in file order, identical to the direct loader's.
    direct = load_plaid("train", length=128)
    assert windows.y.tolist() == direct.y.tolist()
    np.testing.assert_array_equal(windows.X[:, 0, :], direct.X)


def test_a_replay_slice_plays_only_the_chosen_appliances(tmp_path: Path) -> None:
    sensor = plaid_replay(split="test", classes=["fridge", "heater"])
    with SampleStore(tmp_path / "household.db") as store:
        store.register(sensor.name, sensor.channels, sensor.class_names, sensor.source)
        write_all(store, sensor.samples(0))
        windows = store.windows(WindowSpec("plaid", ("current",), 128, mode="segment", labelled=True))
    counts = plaid_class_counts("test")
    assert sorted(set(windows.y.tolist())) == [PLAID_CLASSES.index("fridge"), PLAID_CLASSES.index("heater")]
    assert len(windows) == counts["fridge"] + counts["heater"]
