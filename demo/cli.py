"""`midgate demo`: one MID, three households and a free rider, one buyer, in one process on real parts.

Real Ed25519 keys, DSSE reports, PLAID recordings replayed into SQLite sample stores, torch training of the task
model, Shapley attribution, a SQLite transparency ledger with signed checkpoints and receipts, and an exact
settlement. The demo fails (exit 1) if any step's outcome differs from the expected one, so `make demo` doubles as
a smoke test of everything it touches. What it does not run yet is listed at the end of every run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from protocol.errors import ProtocolError

app = typer.Typer(help="The end-to-end demo on embedded defaults, in one process.")


@app.callback(invoke_without_command=True)
def demo(
    ctx: typer.Context,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Keep every file here (a new or empty folder) instead of a deleted temp dir."),
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, max=5, help="Federated rounds.")] = 3,
) -> None:
    """Run the demo; exit 1 if any outcome differs from the expected one."""
    if ctx.invoked_subcommand is not None:
        return
    console = Console()
    if workdir is not None and workdir.exists() and any(workdir.iterdir()):
        raise typer.BadParameter(f"{workdir} is not empty; the demo starts a new ledger", param_hint="--workdir")
    try:
        ok = _run_in(workdir, console, rounds)
    except ProtocolError as exc:
        # A refusal no step expected (e.g. PLAID missing: sktime not installed) ends the demo with its reason.
        console.print(f"[bold red]the demo stopped:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if not ok:
        raise typer.Exit(1)


def _run_in(workdir: Path | None, console: Console, rounds: int) -> bool:
    # Imported here so that `midgate --help` and the agent's commands do not pay for torch.
    from demo.run import run

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="midgate-demo-") as tmp:
            ok = run(Path(tmp), console, rounds)
        console.print("the files were in a temporary folder, now deleted; keep them with --workdir DIR")
        return ok
    workdir.mkdir(parents=True, exist_ok=True)
    ok = run(workdir.resolve(), console, rounds)
    _print_audit_command(workdir.resolve(), console)
    return ok


def _print_audit_command(workdir: Path, console: Console) -> None:
    console.print("audit the ledger yourself, with a member's checkpoint:")
    console.print(
        f"  midgate ledger verify {workdir / 'ledger.db'} --vkey {workdir / 'log.vkey'} "
        f"--trusted {workdir / 'members' / 'household-1.checkpoint'}",
        soft_wrap=True,
        highlight=False,
    )
    console.print(
        f"  midgate ledger recompute-settlement job-1.settlement --db {workdir / 'ledger.db'}",
        soft_wrap=True,
        highlight=False,
    )
    witnesses = " ".join(f"--witness {p}" for p in sorted((workdir / "members").glob("*.witness.vkey")))
    console.print("check the settlement's receipt offline, with 3 of the 4 members' witness cosignatures required:")
    console.print(
        f"  midgate ledger verify-proof {workdir / 'members' / 'settlement.receipt'} --vkey {workdir / 'log.vkey'} "
        f"--leaf {workdir / 'members' / 'settlement.leaf'} {witnesses} --quorum 3",
        soft_wrap=True,
        highlight=False,
    )
    console.print("and see the MID's rewritten history refused (exit 1):")
    console.print(
        f"  midgate ledger verify {workdir / 'attack' / 'rewritten-ledger.db'} --vkey {workdir / 'log.vkey'} "
        f"--trusted {workdir / 'members' / 'household-1.checkpoint'}",
        soft_wrap=True,
        highlight=False,
    )
