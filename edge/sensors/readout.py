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

from edge.sensors.collection import SampleCollection
from edge.sensors.config import Bme280Config, LinuxConfig, ReplayConfig, SensorConfig, SimulatedConfig
from edge.sensors.driver import DRIVERS
from edge.sensors.errors import SensorError
from edge.sensors.store import SampleStore, SensorHealth, StoreStats


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
    if driver == "mqtt":
        return "configured in agent.toml: a topic and its JSON fields (deploy/raspberrypi/README.md, hub mode)"
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


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.6g}"


def _when(t_ms: int | None, *, precise: bool = False) -> str:
    if t_ms is None:
        return ""
    moment = datetime.fromtimestamp(t_ms / 1000, UTC)
    return moment.strftime("%H:%M:%S.%f")[:-3] if precise else moment.isoformat(timespec="seconds")


def _errors(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "0"


def live_table(collection: SampleCollection) -> Table:
    """What `agent sensors sample` shows while it runs: each sensor's state, newest reading and error counts."""
    written = collection.scheduler.written if collection.scheduler else 0
    table = Table(title=f"live readings -> {written} live samples written to {collection.store.path}")
    for column in ("sensor", "state", "time (UTC)", "readings", "samples", "rate/s", "errors", "last error"):
        table.add_column(column)
    newest = {s.name: s for s in collection.sensors}
    last = (
        {name: status.last_sample for name, status in collection.scheduler.status.items()}
        if collection.scheduler
        else {}
    )
    last.update({load.sensor.name: load.last_sample for load in collection.loads})
    for health in collection.health():
        sample, sensor = last.get(health.name), newest.get(health.name)
        readings = ""
        if sample is not None and sensor is not None:
            readings = "  ".join(
                f"{c.name}={_fmt(v)}{c.unit}" for c, v in zip(sensor.channels, sample.values, strict=True)
            )
        table.add_row(
            health.name,
            health.state,
            _when(health.last_t_ms, precise=True),
            readings,
            str(health.samples),
            f"{health.rate_hz:.1f}",
            _errors(health.errors),
            (health.last_error or "")[:60],
        )
    return table


async def sample_live(configs: list[SensorConfig], store: SampleStore, seconds: float) -> int:
    """Collect from `configs` into `store` with a live table until `seconds` pass (forever if 0), or until nothing is
    left to do (no live sensor, every load done); returns the number of sensors that ran (0: none could start)."""
    async with SampleCollection(configs, store, flush_interval_s=0.5, health_interval_s=1.0) as collection:
        for health in collection.unavailable:
            Console(stderr=True).print(f"skipping {health.name} ({health.driver}): {health.last_error}")
        if not collection.sensors:
            return 0
        end = time.monotonic() + seconds if seconds > 0 else math.inf
        with Live(live_table(collection), refresh_per_second=4, console=Console()) as live:
            while time.monotonic() < end and not collection.done:
                await asyncio.sleep(min(0.25, max(end - time.monotonic(), 0.0)))
                live.update(live_table(collection))
        return len(collection.sensors)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """uvloop where it is installed (its timers keep the sampling grid tighter), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def stats_table(summary: StoreStats) -> Table:
    table = Table(title=f"{summary.path}: {summary.samples} samples, {summary.file_bytes / 1e6:.1f} MB on disk")
    for column in ("sensor", "channels", "classes", "samples", "errors", "labelled", "first (UTC)", "last (UTC)"):
        table.add_column(column, overflow="fold")
    for s in summary.sensors:
        channels = ", ".join(c.name for c in s.channels)
        classes = ", ".join(s.classes) or "-"
        row = (str(s.samples), str(s.errors), str(s.labelled), _when(s.first_t_ms), _when(s.last_t_ms))
        table.add_row(s.name, channels, classes, *row)
    return table


def health_table(reports: list[SensorHealth], now_ms: int, interval_s: float) -> Table:
    """`agent status`'s sensors: what the daemon last wrote, and how long ago; a report older than three
    intervals says the daemon is not running (or stuck)."""
    newest = max((h.updated_ms for h in reports), default=0)
    age_s = (now_ms - newest) / 1000
    stale = " (not updated for a while: is `agent run` running?)" if age_s > 3 * interval_s else ""
    table = Table(title=f"sensors, as the agent saw them {age_s:.0f} s ago{stale}" if reports else "sensors")
    for column in ("sensor", "driver", "state", "rate/s", "samples", "last sample (UTC)", "errors", "last error"):
        table.add_column(column, overflow="fold")
    if not reports:
        table.add_row("-", "-", "no sensor has run yet", "-", "-", "-", "-", "-")
    for h in reports:
        last = f"{_when(h.last_t_ms)} ({(now_ms - h.last_t_ms) / 1000:.0f} s ago)" if h.last_t_ms else "-"
        row = (f"{h.rate_hz:.2f}", str(h.samples), last, _errors(h.errors), (h.last_error or "")[:80])
        table.add_row(h.name, h.driver, h.state, *row)
    return table
