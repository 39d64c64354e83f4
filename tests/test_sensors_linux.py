"""Linux host sensor: real /proc readings that agree with psutil's, the arithmetic on a /proc tree in tmp_path, thermal
zones from a sysfs tree in tmp_path, and a zone that vanishes."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from edge.sensors.linux import LinuxHostSensor, cpu_times, memory_percent, net_bytes
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


def test_proc_readings_agree_with_psutil() -> None:
    """Ours read between two of psutil's: the counters lie between them, memory within a point of both."""
    cpu_before, net_before, memory_before = psutil.cpu_times(), psutil.net_io_counters(), psutil.virtual_memory()
    (busy, total), (rx, tx), memory = cpu_times(), net_bytes(), memory_percent()
    cpu_after, net_after, memory_after = psutil.cpu_times(), psutil.net_io_counters(), psutil.virtual_memory()
    assert net_before.bytes_recv <= rx <= net_after.bytes_recv and net_before.bytes_sent <= tx <= net_after.bytes_sent
    tick = 1 / os.sysconf("SC_CLK_TCK")
    seconds = [sum(t[:8]) for t in (cpu_before, cpu_after)]
    assert seconds[0] - tick <= total * tick <= seconds[1] + tick
    busy_seconds = [s - t.idle - t.iowait for s, t in zip(seconds, (cpu_before, cpu_after), strict=True)]
    assert busy_seconds[0] - tick <= busy * tick <= busy_seconds[1] + tick
    assert (
        min(memory_before.percent, memory_after.percent) - 1
        <= memory
        <= max(memory_before.percent, memory_after.percent) + 1
    )


def _proc_tree(root: Path, cpu: str, available_kib: int, rx: int, tx: int) -> None:
    (root / "net").mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(f"cpu  {cpu}\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n")
    (root / "meminfo").write_text(
        f"MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     {available_kib} kB\n"
    )
    (root / "net" / "dev").write_text(
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls"
        " carrier compressed\n"
        f"    lo: {rx} 1 0 0 0 0 0 0 {tx} 1 0 0 0 0 0 0\n"
        f"  eth0: {rx} 1 0 0 0 0 0 0 {tx} 1 0 0 0 0 0 0\n"
    )


def test_cpu_memory_and_network_from_a_proc_tree(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice: guest time is inside user, not added again
    _proc_tree(tmp_path, "100 0 100 700 100 0 0 0 50 0", 250, 1000, 500)
    sensor = LinuxHostSensor(thermal_root=tmp_path / "no-thermal", proc_root=tmp_path)
    _proc_tree(tmp_path, "160 0 120 780 140 0 0 0 90 0", 400, 3000, 1500)
    values = dict(zip([c.name for c in sensor.channels], sensor.read(1).values, strict=True))
    assert values["cpu_percent"] == pytest.approx(100 * 80 / 200)  # busy 200 -> 280 of total 1000 -> 1200
    assert values["memory_percent"] == pytest.approx(60.0)  # (1000 - 400) / 1000
    assert values["net_rx_bps"] > 0 and values["net_tx_bps"] > 0
    assert values["net_rx_bps"] / values["net_tx_bps"] == pytest.approx(2.0)  # lo and eth0 summed: 4000 and 2000


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
