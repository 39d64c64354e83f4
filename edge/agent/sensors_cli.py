"""`midgate agent sensors list|sample|stats|windows`: the drivers, live readings, what the store holds, and the
windows a job would get.

With `--config agent.toml` the commands use the agent's own `[[sensors]]` and `[sample_store]`, so a member can try
a configuration (a replay of a chosen file included) before `agent run` uses it. The work lives in edge.sensors,
imported inside each command so that the `midgate` entry point stays light."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from edge.agent.config import AgentSettings

app = typer.Typer(no_args_is_help=True, help="Sensor drivers, live readings and the local sample store.")

DEFAULT_STORE = Path("samples.db")
StoreOption = typer.Option("--store", help="the sample store (SQLite file); default: agent.toml's, else samples.db")
ConfigOption = typer.Option("--config", "-c", help="agent.toml: its [[sensors]] and [sample_store]")


def _settings(config: Path | None) -> AgentSettings | None:
    from pydantic import ValidationError

    from edge.agent.config import AgentSettings

    if config is None:
        return None
    try:
        return AgentSettings.load(config)
    except (ValidationError, FileNotFoundError) as exc:
        typer.echo(f"{config}: {exc}", err=True)
        raise typer.Exit(code=2) from None


def _store_path(store: Path | None, settings: AgentSettings | None) -> Path:
    if store is not None:
        return store
    return settings.sample_store.path if settings is not None else DEFAULT_STORE


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
    store_path: Annotated[Path | None, StoreOption] = None,
    config: Annotated[Path | None, ConfigOption] = None,
) -> None:
    """Sample sensors into the store and show their readings live: agent.toml's sensors (--config), or the drivers
    named with -d at --rate."""
    from edge.sensors.config import SampleStoreConfig
    from edge.sensors.readout import run_loop, sample_live, sensor_configs

    if rate_hz <= 0:
        raise typer.BadParameter("--rate must be positive")
    settings = _settings(config)
    if settings is not None and driver:
        raise typer.BadParameter("-d chooses drivers without a config; with --config the sensors are agent.toml's")
    if settings is not None:
        configs = list(settings.sensors)
        store_config = settings.sample_store.model_copy(update={"path": _store_path(store_path, settings)})
        if not configs:
            typer.echo(f"{config} lists no [[sensors]]", err=True)
            raise typer.Exit(code=1)
    else:
        try:
            configs = sensor_configs(driver or ["simulated"], rate_hz, device, seed)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        store_config = SampleStoreConfig(path=_store_path(store_path, None))
    store = store_config.open()
    try:
        before = store.count()
        ran = run_loop(sample_live(configs, store, seconds))
        if ran:
            typer.echo(f"wrote {store.count() - before} samples to {store.path}")
    except KeyboardInterrupt:
        ran = 1
    finally:
        store.close()
    if not ran:
        raise typer.Exit(code=1)


@app.command()
def stats(
    store_path: Annotated[Path | None, StoreOption] = None, config: Annotated[Path | None, ConfigOption] = None
) -> None:
    """Show what the sample store holds, per sensor (channels, class names, counts, time range)."""
    from rich.console import Console

    from edge.sensors.readout import stats_table
    from edge.sensors.store import SampleStore

    path = _store_path(store_path, _settings(config))
    if not path.exists():
        typer.echo(f"no sample store at {path}", err=True)
        raise typer.Exit(code=1)
    with SampleStore(path, readonly=True) as store:
        summary = store.stats()
    Console(width=160).print(stats_table(summary))


@app.command()
def windows(
    task: Annotated[str, typer.Option("--task", help="the task as ID@VERSION, e.g. plaid-appliance@1")],
    store_path: Annotated[Path | None, StoreOption] = None,
    config: Annotated[Path | None, ConfigOption] = None,
    out: Annotated[Path | None, typer.Option("--out", help="also keep the window file here")] = None,
) -> None:
    """Cut a task's windows from the store as the agent does when invited to a job: which sensor, how many windows,
    per class, the dataset fingerprint; or why a job of this task would be declined."""
    import dataclasses
    import tempfile

    from edge.sensors.errors import MissingInputsError, TooFewWindowsError
    from edge.sensors.export import WindowSource
    from protocol.errors import ProtocolError
    from protocol.tasks.spec import get_task

    task_id, _, version = task.partition("@")
    try:
        spec = get_task(task_id, int(version or "1"))
    except (ValueError, ProtocolError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = _settings(config)
    source = settings.window_source if settings is not None else WindowSource(DEFAULT_STORE)
    if store_path is not None:
        source = dataclasses.replace(source, store_path=store_path)
    with tempfile.TemporaryDirectory() as scratch:
        target = out or Path(scratch) / "windows.npz"
        try:
            cut = source.cut(spec, target)
        except (MissingInputsError, TooFewWindowsError) as exc:
            typer.echo(f"a job of {spec.key} would be declined: {exc}", err=True)
            raise typer.Exit(code=1) from None
    typer.echo(f"{cut.count} windows of {cut.task} from sensor {cut.sensor}; fingerprint {cut.fingerprint}")
    if cut.per_class:
        typer.echo("per class: " + ", ".join(f"{name} {n}" for name, n in cut.per_class.items()))
    if out is not None:
        typer.echo(f"window file: {out}")
