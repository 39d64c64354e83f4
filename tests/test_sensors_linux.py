"""Linux host sensor: real psutil readings, thermal zones from a sysfs tree in tmp_path, and a zone that vanishes."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.sensors.linux import LinuxHostSensor
from edge.sensors.sample import Quality


def make_zone(root: Path, index: int, kind: str, millidegrees: int) -> Path:
    zone = root / f"thermal_zone{index}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(f"{kind}\n")
    (zone / "temp").write_text(f"{millidegrees}\n")
    return zone


def test_host_channels_are_real_readings(tmp_path: Path) -> None:
    sensor = LinuxHostSensor(thermal_root=tmp_path / "no-thermal")
    sample = sensor.read(1)
    values = dict(zip([c.name for c in sensor.channels], sample.values, strict=True))
    assert set(values) == {"cpu_percent", "memory_percent", "load1", "net_rx_bps", "net_tx_bps"}
    assert 0.0 < values["memory_percent"] < 100.0
    assert 0.0 <= values["cpu_percent"] <= 100.0
    assert values["load1"] >= 0.0
    assert sample.quality == Quality.OK


def test_thermal_zones_in_millidegrees(tmp_path: Path) -> None:
    make_zone(tmp_path, 0, "acpitz", 27800)
    make_zone(tmp_path, 1, "x86_pkg_temp", 45250)
    sensor = LinuxHostSensor(thermal_root=tmp_path)
    values = dict(zip([c.name for c in sensor.channels], sensor.read(1).values, strict=True))
    assert values["cpu_temp_c"] == pytest.approx(45.25)  # the zone whose type names a CPU package
    assert values["thermal_zone0_c"] == pytest.approx(27.8)


def test_a_missing_sysfs_file_fails_only_its_channel(tmp_path: Path) -> None:
    make_zone(tmp_path, 0, "cpu-thermal", 51000)
    gone = make_zone(tmp_path, 1, "gpu-thermal", 40000)
    sensor = LinuxHostSensor(thermal_root=tmp_path)
    (gone / "temp").unlink()
    sample = sensor.read(1)
    values = dict(zip([c.name for c in sensor.channels], sample.values, strict=True))
    assert sample.quality == Quality.PARTIAL
    assert sample.error is not None and "sensor_unavailable" in sample.error and str(gone / "temp") in sample.error
    assert values["thermal_zone1_c"] != values["thermal_zone1_c"]  # NaN
    assert values["cpu_temp_c"] == pytest.approx(51.0)
    assert 0.0 < values["memory_percent"] < 100.0


def test_a_garbled_sysfs_value_is_reported(tmp_path: Path) -> None:
    zone = make_zone(tmp_path, 0, "cpu-thermal", 51000)
    sensor = LinuxHostSensor(thermal_root=tmp_path)
    (zone / "temp").write_text("hot\n")
    sample = sensor.read(1)
    assert sample.quality == Quality.PARTIAL and sample.error and "not an integer" in sample.error
