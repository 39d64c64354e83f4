"""`midgate agent sensors list|sample|stats`: what drivers there are, live readings, and what the store holds.

The work lives in edge.sensors.readout, imported inside each command so that the `midgate` entry point stays
light."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="Sensor drivers, live readings and the local sample store.")

DEFAULT_STORE = Path("samples.db")
StoreOption = typer.Option("--store", help="the device's sample store (SQLite file)")


@app.command("list")
def list_drivers() -> None:
    """Show the sensor drivers and whether each can run on this machine."""
    from rich.console import Console

    from edge.sensors.readout import driver_table

    Console().print(driver_table())


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
    from edge.sensors.config import SampleStoreConfig
    from edge.sensors.readout import build_available, run_loop, sample_live, sensor_configs

    if rate_hz <= 0:
        raise typer.BadParameter("--rate must be positive")
    try:
        configs = sensor_configs(driver or ["simulated"], rate_hz, device, seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    sensors, skipped = build_available(configs)
    for line in skipped:
        typer.echo(line, err=True)
    if not sensors:
        raise typer.Exit(code=1)
    store = SampleStoreConfig(path=store_path).open()
    try:
        written = run_loop(sample_live(sensors, store, seconds))
        typer.echo(f"wrote {written} samples to {store_path}")
    except KeyboardInterrupt:
        pass
    finally:
        for sensor in sensors:
            sensor.close()
        store.close()


@app.command()
def stats(store_path: Annotated[Path, StoreOption] = DEFAULT_STORE) -> None:
    """Show what the sample store holds, per sensor."""
    from rich.console import Console

    from edge.sensors.readout import stats_table
    from edge.sensors.store import SampleStore

    if not store_path.exists():
        typer.echo(f"no sample store at {store_path}", err=True)
        raise typer.Exit(code=1)
    with SampleStore(store_path) as store:
        summary = store.stats()
    Console(width=160).print(stats_table(summary))
