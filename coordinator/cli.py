"""`midgate coordinator` commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True, help="MID operator commands: serve the coordinator, broker configuration, invites, registry."
)
