"""`midgate demo`: one MID, five households (one a planted free rider, one paused, one striking against the buyer),
one buyer, on the processes a MID runs: Mosquitto (or, only where it cannot be installed, an embedded broker, named
as such), `coordinator serve` with its Flower SuperLink, an `agent run` per household, and the operator's,
members' and buyer's commands. The demo fails (exit 1) if any outcome differs from the expected one, and stops every
process it started, also on Ctrl-C and SIGTERM. What it does not run is listed at the end of every run.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="The end-to-end demo on the processes a MID runs (Mosquitto, serve, SuperLink, agents).")

DEFAULT_ROUNDS = 8


@app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep every file and log here (a new or empty folder) instead of a temp dir."),
    ] = None,
    rounds: Annotated[
        int,
        typer.Option("--rounds", min=1, max=60, help="Federated rounds (the task's recipe: 60; see docs/demo.md)."),
    ] = DEFAULT_ROUNDS,
    broker: Annotated[
        str,
        typer.Option(help="auto: Mosquitto when installed, else the embedded broker; or mosquitto, embedded."),
    ] = "auto",
) -> None:
    """Run the demo; exit 1 if any outcome differs from the expected one, 130 when interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    if broker not in ("auto", "mosquitto", "embedded"):
        raise typer.BadParameter("auto, mosquitto or embedded", param_hint="--broker")
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        raise typer.BadParameter(f"{workdir} is not empty; the demo starts a new MID", param_hint="--workdir")
    # Piped into a file or a test, Rich would squeeze the tables into 80 columns.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ok = _run_in(workdir, console, rounds, broker)
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]: every process the demo started has been stopped")
        raise typer.Exit(130) from None
    except LookupError as error:
        console.print(f"[bold red]the demo cannot start:[/] {error}")
        raise typer.Exit(1) from None
    if not ok:
        raise typer.Exit(1)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the demo as Ctrl-C does: through its cleanup."""
    raise KeyboardInterrupt


def _run_in(workdir: Path | None, console: Console, rounds: int, broker: str) -> bool:
    # Imported here so that `midgate --help` and the agent's commands do not pay for the demo's imports.
    from demo.run import run_demo
    from demo.services import DemoStepError

    def attempt(folder: Path) -> bool:
        try:
            return run_demo(folder, console, rounds, broker)
        except DemoStepError as error:
            console.print(f"[bold red]the demo stopped:[/] {error}", highlight=False)
            console.print(f"every process's log is in {folder / 'logs'}")
            return False

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="midgate-demo-") as tmp:
            ok = attempt(Path(tmp))
        console.print("the files were in a temporary folder, now deleted; keep them with --workdir DIR")
        return ok
    workdir.mkdir(parents=True, exist_ok=True)
    return attempt(workdir.resolve())
