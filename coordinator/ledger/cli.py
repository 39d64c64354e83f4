"""`midgate ledger` commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    help="Transparency-ledger commands: verify a ledger, show entries, print and check proofs offline.",
)
