"""What the `midgate agent sensors` commands show: the driver catalogue, a live table of readings, store statistics.
Kept apart from cli.py so that `midgate --help` does not import SQLite, numpy and the drivers."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from edge.sensors.config import (
    Bme280Config,
    LinuxConfig,
    ReplayConfig,
    SensorConfig,
    SimulatedConfig,
    build_sensor,
)
from edge.sensors.driver import DRIVERS, Sensor
from edge.sensors.errors import SensorError
from edge.sensors.scheduler import SamplingScheduler
from edge.sensors.store import SampleStore, StoreStats


def availability(driver: str) -> str:
    """Whether a driver can run on this machine, in a few words."""
    if driver == "simulated":
        return "yes"
    if driver == "linux":
        zones = len(list(Path("/sys/class/thermal").glob("thermal_zone*")))
        return f"yes ({zones} thermal zones)"
    if driver == "bme280":
        buses = sorted(p.name for p in Path("/dev").glob("i2c-*"))
        return f"I2C buses: {', '.join(buses)}" if buses else "no I2C bus (/dev/i2c-*)"
    try:
        from edge.sensors.plaid import plaid_dir

        return f"PLAID at {plaid_dir()}"
    except SensorError as exc:
        return f"PLAID missing: {exc.message}"


def driver_table() -> Table:
    table = Table(title="sensor drivers")
    for column in ("driver", "what it reads", "available here"):
        table.add_column(column)
    for name, description in DRIVERS.items():
        table.add_row(name, description, availability(name))
    return table


def sensor_configs(drivers: list[str], rate_hz: float, device: str, seed: int) -> list[SensorConfig]:
    """Default configs of the named drivers at `rate_hz`; raises ValueError naming unknown drivers."""
    period = 1000.0 / rate_hz
    known: dict[str, SensorConfig] = {
        "simulated": SimulatedConfig(period_ms=period, device=device, seed=seed),
        "linux": LinuxConfig(period_ms=period),
        "bme280": Bme280Config(period_ms=period),
        "replay": ReplayConfig(rate_hz=rate_hz),
    }
    unknown = [d for d in drivers if d not in known]
    if unknown:
        raise ValueError(f"unknown driver(s) {unknown}; choose from {list(known)}")
    return [known[d] for d in drivers]


def build_available(configs: list[SensorConfig]) -> tuple[list[Sensor], list[str]]:
    """The sensors that could be started, and one line per sensor that could not (with its reason code)."""
    sensors: list[Sensor] = []
    skipped: list[str] = []
    for config in configs:
        try:
            sensors.append(build_sensor(config))
        except SensorError as exc:
            skipped.append(f"skipping {config.driver}: {exc}")
    return sensors, skipped


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.6g}"


def live_table(scheduler: SamplingScheduler, sensors: list[Sensor]) -> Table:
    table = Table(title=f"live readings -> {scheduler.written} samples written")
    for column in ("sensor", "time (UTC)", "readings", "flags", "samples", "failures", "skipped", "last error"):
        table.add_column(column)
    for sensor in sensors:
        status = scheduler.status[sensor.name]
        last = status.last_sample
        when = readings = flags = ""
        if last is not None:
            when = datetime.fromtimestamp(last.t_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3]
            readings = "  ".join(
                f"{c.name}={_fmt(v)}{c.unit}" for c, v in zip(sensor.channels, last.values, strict=True)
            )
            flags = str(last.quality.name or int(last.quality))
        row = (str(status.samples), str(status.failures), str(status.skipped_ticks), (status.last_error or "")[:60])
        table.add_row(sensor.name, when, readings, flags, *row)
    return table


async def sample_live(sensors: list[Sensor], store: SampleStore, seconds: float) -> int:
    """Sample into `store` with a live table until `seconds` pass (forever if 0); returns samples written."""
    async with SamplingScheduler(sensors, store, flush_interval_s=0.5) as scheduler:
        end = time.monotonic() + seconds if seconds > 0 else math.inf
        with Live(live_table(scheduler, sensors), refresh_per_second=4, console=Console()) as live:
            while time.monotonic() < end:
                await asyncio.sleep(min(0.25, max(end - time.monotonic(), 0.0)))
                live.update(live_table(scheduler, sensors))
    return scheduler.written


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """uvloop where it is installed (its timers keep the sampling grid tighter), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def stats_table(summary: StoreStats) -> Table:
    table = Table(title=f"{summary.path}: {summary.samples} samples, {summary.file_bytes / 1e6:.1f} MB on disk")
    for column in ("sensor", "channels", "samples", "errors", "labelled", "first (UTC)", "last (UTC)"):
        table.add_column(column)

    def when(t: int | None) -> str:
        return "" if t is None else datetime.fromtimestamp(t / 1000, UTC).isoformat(timespec="seconds")

    for s in summary.sensors:
        channels = ", ".join(c.name for c in s.channels)
        table.add_row(
            s.name, channels, str(s.samples), str(s.errors), str(s.labelled), when(s.first_t_ms), when(s.last_t_ms)
        )
    return table
