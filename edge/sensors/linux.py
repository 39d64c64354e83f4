"""Host sensors of any Linux box or Raspberry Pi: CPU load, memory, load average, network throughput (from /proc) and
the thermal zones under /sys/class/thermal.

The /proc files are read as psutil reads them (`cpu_percent`, `virtual_memory().percent`, `net_io_counters`; tests
check the two agree), without psutil itself: it cost the idle agent 0.8 MB of its 50 MB budget on a Raspberry Pi hub
(BENCHMARKS.md, "Raspberry Pi hub").

Thermal zones are listed once at start; a zone whose `temp` file later disappears or fails to read makes that
channel NaN and the sample PARTIAL (with the path in `Sample.error`) while the other channels keep coming. Network
counters are turned into bytes per second between reads, because raw counters grow without bound and float32
storage would lose their low digits.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from edge.sensors.errors import SensorUnavailableError
from edge.sensors.sample import ChannelSpec, Quality, Sample

THERMAL_ROOT = Path("/sys/class/thermal")
PROC_ROOT = Path("/proc")
_CPU_ZONE_TYPES = re.compile(r"cpu|x86_pkg_temp|soc|core|package", re.IGNORECASE)


class LinuxHostSensor:
    """Parameters: name (default "host"), period_ms (default 1000), thermal_root (default /sys/class/thermal).

    Channels: cpu_percent, memory_percent, load1, net_rx_bps, net_tx_bps, then cpu_temp_c (the first zone whose type
    looks like a CPU, else zone 0) and one `thermal_zoneN_c` per zone, when the host has thermal zones.
    """

    blocking = False  # procfs and sysfs reads are microseconds; no bus that can stall
    class_names: tuple[str, ...] = ()  # unlabelled
    source: str = "linux"

    def __init__(
        self,
        name: str = "host",
        *,
        period_ms: float = 1000.0,
        thermal_root: Path = THERMAL_ROOT,
        proc_root: Path = PROC_ROOT,
    ) -> None:
        self.name = name
        self.proc_root = proc_root
        self.period_ms = period_ms
        self.zones = sorted(
            (p for p in thermal_root.glob("thermal_zone*") if (p / "temp").exists()),
            key=lambda p: int(p.name.removeprefix("thermal_zone") or 0),
        )
        channels = [
            ChannelSpec("cpu_percent", "%"),
            ChannelSpec("memory_percent", "%"),
            ChannelSpec("load1", ""),
            ChannelSpec("net_rx_bps", "B/s"),
            ChannelSpec("net_tx_bps", "B/s"),
        ]
        self.cpu_zone: Path | None = None
        if self.zones:
            self.cpu_zone = next((z for z in self.zones if _CPU_ZONE_TYPES.search(_zone_type(z))), self.zones[0])
            channels.append(ChannelSpec("cpu_temp_c", "°C"))
            channels.extend(ChannelSpec(f"{z.name}_c", "°C") for z in self.zones)
        self.channels = tuple(channels)
        self._cpu = cpu_times(proc_root)  # the first reading only sets the reference point
        self._net = net_bytes(proc_root)
        self._net_t = time.monotonic()

    def _net_rates(self) -> tuple[float, float]:
        now = time.monotonic()
        counters = net_bytes(self.proc_root)
        elapsed = max(now - self._net_t, 1e-6)
        rx = max(counters[0] - self._net[0], 0) / elapsed
        tx = max(counters[1] - self._net[1], 0) / elapsed
        self._net, self._net_t = counters, now
        return rx, tx

    def _cpu_percent(self) -> float:
        now = cpu_times(self.proc_root)
        busy, total = now[0] - self._cpu[0], now[1] - self._cpu[1]
        self._cpu = now
        return 0.0 if total <= 0 else min(max(100.0 * busy / total, 0.0), 100.0)

    def read(self, t_ms: int) -> Sample:
        rx, tx = self._net_rates()
        values = [self._cpu_percent(), memory_percent(self.proc_root), os.getloadavg()[0], rx, tx]
        errors: list[str] = []
        temps: dict[Path, float] = {}
        for zone in self.zones:
            try:
                temps[zone] = read_zone_celsius(zone)
            except SensorUnavailableError as exc:
                temps[zone] = float("nan")
                errors.append(str(exc))
        if self.cpu_zone is not None:
            values.append(temps[self.cpu_zone])
            values.extend(temps[z] for z in self.zones)
        quality = Quality.PARTIAL if errors else Quality.OK
        return Sample(self.name, t_ms, tuple(float(v) for v in values), quality, error="; ".join(errors) or None)

    def close(self) -> None:
        pass


def cpu_times(proc_root: Path = PROC_ROOT) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat's `cpu` line. As psutil counts them: guest
    time is already inside user and nice, and idle and iowait are not busy."""
    fields = [int(f) for f in (proc_root / "stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal; guest and guest_nice are in user, nice
    return total - fields[3] - fields[4], total


def memory_percent(proc_root: Path = PROC_ROOT) -> float:
    """Memory in use, in percent of the total, as psutil's `virtual_memory().percent`: (total - available) / total."""
    kib = {}
    for line in (proc_root / "meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("MemTotal", "MemAvailable"):
            kib[name] = int(value.split()[0])
    total = kib["MemTotal"]
    return 100.0 * (total - kib["MemAvailable"]) / total


def net_bytes(proc_root: Path = PROC_ROOT) -> tuple[int, int]:
    """(received, sent) bytes of every network interface since boot, loopback included, as psutil's
    `net_io_counters()` sums them, from /proc/net/dev."""
    rx = tx = 0
    for line in (proc_root / "net" / "dev").read_text().splitlines()[2:]:
        counters = line.partition(":")[2].split()
        rx += int(counters[0])
        tx += int(counters[8])
    return rx, tx


def _zone_type(zone: Path) -> str:
    try:
        return (zone / "type").read_text().strip()
    except OSError:
        return ""


def read_zone_celsius(zone: Path) -> float:
    """A thermal zone's temperature; sysfs reports millidegrees Celsius."""
    path = zone / "temp"
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise SensorUnavailableError("thermal zone unreadable", path=str(path), error=exc.strerror) from exc
    try:
        return int(text) / 1000.0
    except ValueError as exc:
        raise SensorUnavailableError("thermal zone value is not an integer", path=str(path), found=text[:16]) from exc
