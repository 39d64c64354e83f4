"""`midgate agent` commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    help="Member commands: run the agent daemon, enrol, sensors, knob, consent, pause, strike, statements.",
)
