"""Export of a task's windows from the store to the window file the federated ClientApp reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.sensors.export import FINGERPRINT_PREFIX, export_task_windows
from edge.sensors.fingerprint import dataset_fingerprint
from edge.sensors.replay import plaid_class_counts, plaid_replay
from edge.sensors.sample import ChannelSpec, Sample
from edge.sensors.simulated import SimulatedEnvironmentSensor
from edge.sensors.store import SampleStore, write_all
from protocol.tasks.spec import ENV_FORECAST, PLAID_APPLIANCE
from protocol.tasks.windows import load_window_file


def test_plaid_task_file_loads_with_the_task_checks_and_keeps_the_data_sets_labels(tmp_path: Path) -> None:
    sensor = plaid_replay(split="test")
    with SampleStore(tmp_path / "d.db") as store:
        store.register(sensor.name, sensor.channels, sensor.class_names, sensor.source)
        write_all(store, sensor.samples(0))
        window_set, windows = export_task_windows(store, PLAID_APPLIANCE, "plaid", tmp_path / "plaid.npz")
    loaded = load_window_file(tmp_path / "plaid.npz", PLAID_APPLIANCE)
    assert loaded.x.shape == (537, 1, 128)
    assert loaded.y is not None
    counts = np.bincount(loaded.y, minlength=11).tolist()
    assert counts == list(plaid_class_counts("test").values())
    assert loaded.fingerprint == window_set.fingerprint == FINGERPRINT_PREFIX + windows.fingerprint().hex()
    with np.load(tmp_path / "plaid.npz") as raw:
        hashes = raw["hashes"]
    # A round that uses a subset can name exactly that subset from the file alone.
    chosen = [5, 3, 400]
    assert dataset_fingerprint([bytes(h) for h in hashes[chosen]]) == windows.subset(chosen).fingerprint()


def test_forecast_targets_are_the_next_sample(tmp_path: Path) -> None:
    env = SimulatedEnvironmentSensor("bme", device="a", dropout=0, spike=0, stuck=0)
    channels = (
        ChannelSpec("temperature_c", "°C"),
        ChannelSpec("humidity_pct", "%RH"),
        ChannelSpec("pressure_hpa", "hPa"),
    )
    with SampleStore(tmp_path / "d.db") as store:
        store.register("bme", channels, source="bme280")
        store.write([Sample("bme", t, env.read(t).values[:3]) for t in range(0, 330_000, 1000)])
        window_set, _ = export_task_windows(store, ENV_FORECAST, "bme", tmp_path / "env.npz")
    assert window_set.x.shape == (10, 3, 32)  # 330 samples -> 10 windows of 33 (32 inputs + 1 target)
    assert window_set.y is not None
    loaded = load_window_file(tmp_path / "env.npz", ENV_FORECAST)
    np.testing.assert_array_equal(loaded.x, window_set.x)
    first_target_t = 32 * 1000
    expected = np.array(env.read(first_target_t).values[:3], dtype=np.float32)
    np.testing.assert_array_equal(loaded.y[0], expected)  # type: ignore[index]
