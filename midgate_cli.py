"""The `midgate` console script: one sub-command group per role, each defined inside its own package."""

from __future__ import annotations

import typer

from coordinator.buyer.cli import app as buyer_app
from coordinator.cli import app as coordinator_app
from coordinator.ledger.cli import app as ledger_app
from coordinator.royalties.cli import recompute_settlement_command
from demo.cli import app as demo_app
from edge.agent.cli import app as agent_app

app = typer.Typer(no_args_is_help=True, help="midgate: federated data-pool gateway for MIDs.")
app.add_typer(agent_app, name="agent")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(buyer_app, name="buyer")
# The auditor's commands read only the ledger; recompute-settlement is the royalty component's, so it is mounted here
# rather than imported by the ledger's CLI (the ledger sits below money: pyproject's import-linter contract).
ledger_app.command("recompute-settlement")(recompute_settlement_command)
app.add_typer(ledger_app, name="ledger")
app.add_typer(demo_app, name="demo")
