"""`midgate buyer` commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True, help="AI buyer commands: quotes, jobs, models and their provenance, revenue reports."
)
