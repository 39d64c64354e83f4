"""Royalty commands over the ledger: recompute a settlement, print a member statement, record model revenue.

`recompute_settlement_command` is meant to be registered as `midgate ledger recompute-settlement ID`
(coordinator/ledger/cli.py belongs to the ledger component; the lead wires it there). Exit codes follow the ledger
commands: 0 and `ok` when the stored record reproduces, 1 and the reason when not.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from coordinator.ledger.store import LedgerReader, LedgerStore
from protocol.errors import ProtocolError
from protocol.identity import load_signer_key

# The record code (pydantic models, and through the attribution vector numpy) is imported inside the commands:
# `midgate ledger` mounts recompute-settlement, and every `midgate` invocation imports that module.

app = typer.Typer(no_args_is_help=True, help="Royalty commands over the ledger: recompute settlements, statements.")

LedgerFile = Annotated[Path, typer.Option("--db", exists=True, dir_okay=False, readable=True, help="ledger file")]


@app.command("recompute-settlement")
def recompute_settlement_command(
    record_id: Annotated[str, typer.Argument(help="the record id of a settlement or royalty leaf")], db: LedgerFile
) -> None:
    """Recompute a settlement or royalty record from the inputs stored in its leaf and compare byte for byte."""
    from coordinator.royalties.ledger_records import recompute_from_ledger

    try:
        with LedgerReader.open_existing(db) as reader:
            result = recompute_from_ledger(reader, record_id)
    except ProtocolError as error:
        typer.echo(f"invalid: {error}", err=True)
        raise typer.Exit(1) from None
    if not result.matches:
        typer.echo(
            f"invalid: settlement_mismatch: leaf {result.index} stores sha256 {result.stored_sha256}, its inputs"
            f" compute {result.recomputed_sha256}",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo("ok")
    typer.echo(f"leaf {result.index}: record {record_id} reproduces (sha256 {result.stored_sha256})", err=True)


@app.command("statement")
def statement_command(
    member: Annotated[str, typer.Argument(help="member id")],
    db: LedgerFile,
    start_ms: Annotated[int, typer.Option(help="period start, ms since epoch UTC (inclusive)")] = 0,
    end_ms: Annotated[int, typer.Option(help="period end, ms since epoch UTC (exclusive)")] = 2**63 - 1,
    receipts: Annotated[bool, typer.Option(help="print the tlog-proof receipt of every record as JSON")] = False,
) -> None:
    """A member's plain statement for a period, from the ledger alone."""
    from coordinator.royalties.ledger_records import statement_from_ledger
    from coordinator.royalties.statement import render_statement

    try:
        with LedgerReader.open_existing(db) as reader:
            result = statement_from_ledger(reader, member, period_start_ms=start_ms, period_end_ms=end_ms)
    except ProtocolError as error:
        typer.echo(f"invalid: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(render_statement(result.statement), nl=False)
    if receipts:
        typer.echo(json.dumps(result.receipts, indent=2, sort_keys=True))


@app.command("record-revenue")
def record_revenue_command(
    model_version: Annotated[str, typer.Argument(help="the model version the revenue was earned with")],
    revenue_minor: Annotated[int, typer.Argument(min=0, help="revenue in integer minor units")],
    record_id: Annotated[str, typer.Option(help="id of the royalty record (unique in the ledger)")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code")],
    db: Annotated[Path, typer.Option("--db", dir_okay=False, help="ledger file (the coordinator's)")],
    log_key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="the MID's log signing key file")],
    registry: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False,
            help="the MID's registry, for departed members (default: registry.sqlite beside the ledger, if there)",
        ),
    ] = None,
) -> None:
    """Operator side of a buyer's revenue report: split it by the model's stored attribution and log the split
    (a departed member's royalties end when the model's policy says so: README, "Leaving")."""
    from coordinator.registry.store import Registry
    from coordinator.royalties.ledger_records import departed_members, report_revenue

    registry_path = registry if registry is not None else db.parent / "registry.sqlite"
    try:
        departed = []
        if registry_path.is_file():
            with contextlib.closing(Registry(registry_path)) as opened:
                departed = departed_members(opened.departures().values())
        key = load_signer_key(log_key)
        with LedgerStore.open(db, key) as store:
            index = report_revenue(
                store,
                model_version,
                revenue_minor,
                record_id=record_id,
                created_ms=time.time_ns() // 1_000_000,
                currency=currency,
                departed=departed,
            )
    except ProtocolError as error:
        typer.echo(f"invalid: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"royalty record {record_id} at leaf {index}")
