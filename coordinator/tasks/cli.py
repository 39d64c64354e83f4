"""`midgate coordinator task add FILE | list | show ID@VERSION`: the operator's approval of task specs (`task proposals`
and `task approve JOB`, of specs buyers proposed, are coordinator/market/cli.py's).

Imports live inside the commands: every `midgate` invocation (the agent's too) imports the CLI modules.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from coordinator.config import CoordinatorSettings
    from coordinator.tasks.catalogue import SignedTask, TaskCatalogue

app = typer.Typer(
    no_args_is_help=True, help="Task specs: approve one (signed with the MID key, served to devices), list, show."
)

SpecFileArgument = typer.Argument(..., exists=True, dir_okay=False, help="the task spec (JSON, docs/protocol.md)")
ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")


def _settings(config: Path | None) -> CoordinatorSettings:
    from coordinator.config import CoordinatorSettings

    return CoordinatorSettings.load_for_command(config)


@contextlib.contextmanager
def open_catalogue(settings: CoordinatorSettings) -> Iterator[TaskCatalogue]:
    """The MID's task catalogue, created (with the built-ins signed in) on first use."""
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.tasks.catalogue import TaskCatalogue
    from protocol.private_files import private_dir

    private_dir(settings.data_dir)
    mid_key = load_or_create_mid_key(settings.mid_key_file, settings.mid)
    catalogue = TaskCatalogue(settings.tasks_path, mid_key, time.time_ns() // 1_000_000)
    try:
        yield catalogue
    finally:
        catalogue.close()


def _line(task: SignedTask) -> str:
    spec = task.spec
    inputs = ", ".join(f"{i.name}[{i.unit}] from {'|'.join(i.sources)}" for i in spec.inputs)
    return f"{spec.key}  {spec.kind}  {spec.model.family}  {inputs}  {spec.description}"


@app.command()
def add(
    file: Path = SpecFileArgument,
    config: Path | None = ConfigOption,
) -> None:
    """Approve a task spec: checked (schema, vetted model family, bounds), signed with the MID key and kept; devices
    fetch it when a job names it. A published id@version never changes: another spec under it is refused."""
    from protocol.errors import ProtocolError
    from protocol.tasks.spec import MAX_TASK_SPEC_BYTES, parse_task_spec

    settings = _settings(config)
    try:
        with file.open("rb") as fh:
            spec = parse_task_spec(fh.read(MAX_TASK_SPEC_BYTES + 1))
        with open_catalogue(settings) as catalogue:
            added = catalogue.add(spec, time.time_ns() // 1_000_000)
    except ProtocolError as error:
        typer.echo(f"task refused: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"added: {_line(added)}")


@app.command("list")
def list_tasks(config: Path | None = ConfigOption) -> None:
    """The MID's tasks, one line each: id@version, kind, model family, inputs (unit, sources), description."""
    with open_catalogue(_settings(config)) as catalogue:
        for task in catalogue.list():
            typer.echo(_line(task))


@app.command()
def show(
    task: str = typer.Argument(..., help="id@version, e.g. plaid-appliance@1"),
    config: Path | None = ConfigOption,
) -> None:
    """The task's spec as JSON, as devices receive it inside the MID's signature."""
    from protocol.errors import ProtocolError

    task_id, _, version = task.partition("@")
    if not version.isdecimal():
        typer.echo("task: give id@version, e.g. plaid-appliance@1", err=True)
        raise typer.Exit(2)
    try:
        with open_catalogue(_settings(config)) as catalogue:
            found = catalogue.get(task_id, int(version))
    except ProtocolError as error:
        typer.echo(f"{error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(found.spec.model_dump_json(indent=2))
