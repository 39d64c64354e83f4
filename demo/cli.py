"""`midgate demo`: the end-to-end demo."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, help="The end-to-end demo on embedded defaults.")
