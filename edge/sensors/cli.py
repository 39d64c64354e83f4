"""`midgate agent sensors list|sample|stats`: what drivers there are, live readings, and what the store holds."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from edge.sensors.config import (
    Bme280Config,
    LinuxConfig,
    ReplayConfig,
    SampleStoreConfig,
    SensorConfig,
    SimulatedConfig,
    build_sensor,
)
from edge.sensors.driver import DRIVERS, Sensor
from edge.sensors.errors import SensorError
from edge.sensors.scheduler import SamplingScheduler
from edge.sensors.store import SampleStore

app = typer.Typer(no_args_is_help=True, help="Sensor drivers, live readings and the local sample store.")

DEFAULT_STORE = Path("samples.db")
StoreOption = typer.Option("--store", help="the device's sample store (SQLite file)")


def _availability(driver: str) -> str:
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


@app.command("list")
def list_drivers() -> None:
    """Show the sensor drivers and whether each can run on this machine."""
    table = Table(title="sensor drivers")
    for column in ("driver", "what it reads", "available here"):
        table.add_column(column)
    for name, description in DRIVERS.items():
        table.add_row(name, description, _availability(name))
    Console().print(table)


def _configs(drivers: list[str], rate_hz: float, device: str, seed: int) -> list[SensorConfig]:
    period = 1000.0 / rate_hz
    known: dict[str, SensorConfig] = {
        "simulated": SimulatedConfig(period_ms=period, device=device, seed=seed),
        "linux": LinuxConfig(period_ms=period),
        "bme280": Bme280Config(period_ms=period),
        "replay": ReplayConfig(rate_hz=rate_hz),
    }
    unknown = [d for d in drivers if d not in known]
    if unknown:
        raise typer.BadParameter(f"unknown driver(s) {unknown}; choose from {list(known)}")
    return [known[d] for d in drivers]


def _fmt(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.6g}"


def _live_table(scheduler: SamplingScheduler, sensors: list[Sensor]) -> Table:
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
        error = (status.last_error or "")[:60]
        table.add_row(
            sensor.name,
            when,
            readings,
            flags,
            str(status.samples),
            str(status.failures),
            str(status.skipped_ticks),
            error,
        )
    return table


@app.command()
def sample(
    driver: Annotated[list[str] | None, typer.Option("--driver", "-d", help="simulated, linux, bme280, replay")] = None,
    rate_hz: Annotated[float, typer.Option("--rate", help="samples per second per sensor")] = 1.0,
    seconds: Annotated[float, typer.Option("--seconds", help="stop after this long (0 = until Ctrl-C)")] = 0.0,
    device: Annotated[str, typer.Option("--device", help="simulated household id")] = "device-0",
    seed: Annotated[int, typer.Option("--seed", help="simulation seed")] = 0,
    store_path: Annotated[Path, StoreOption] = DEFAULT_STORE,
) -> None:
    """Sample the chosen sensors into the store and show their readings live."""
    if rate_hz <= 0:
        raise typer.BadParameter("--rate must be positive")
    sensors: list[Sensor] = []
    for config in _configs(driver or ["simulated"], rate_hz, device, seed):
        try:
            sensors.append(build_sensor(config))
        except SensorError as exc:
            typer.echo(f"skipping {config.driver}: {exc}", err=True)
    if not sensors:
        raise typer.Exit(code=1)
    store = SampleStoreConfig(path=store_path).open()

    async def run() -> None:
        async with SamplingScheduler(sensors, store, flush_interval_s=0.5) as scheduler:
            end = time.monotonic() + seconds if seconds > 0 else math.inf
            with Live(_live_table(scheduler, sensors), refresh_per_second=4, console=Console()) as live:
                while time.monotonic() < end:
                    await asyncio.sleep(min(0.25, max(end - time.monotonic(), 0.0)))
                    live.update(_live_table(scheduler, sensors))
        typer.echo(f"wrote {scheduler.written} samples to {store_path}")

    try:
        _run_loop(run())
    except KeyboardInterrupt:
        pass
    finally:
        for sensor in sensors:
            sensor.close()
        store.close()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """uvloop where it is installed (its timers keep the sampling grid tighter), asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


@app.command()
def stats(store_path: Annotated[Path, StoreOption] = DEFAULT_STORE) -> None:
    """Show what the sample store holds, per sensor."""
    if not store_path.exists():
        typer.echo(f"no sample store at {store_path}", err=True)
        raise typer.Exit(code=1)
    with SampleStore(store_path) as store:
        summary = store.stats()
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
    Console(width=160).print(table)
