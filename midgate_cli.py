"""The `midgate` console script: one sub-command group per role, each defined inside its own package.

Errors a user can cause or meet -- a missing or invalid config file, an unreachable broker or coordinator, a refused
invite, an unreadable database -- end the command with one line on stderr and exit code 1 (2 for an invalid
config), never a traceback: `MidgateApp` says them (midgate_errors). Anything else is a bug and keeps its traceback,
printed without local variables (they hold invite tokens, passwords and settings).
"""

from __future__ import annotations

from typing import Any

import typer

from coordinator.buyer.cli import app as buyer_app
from coordinator.cli import app as coordinator_app
from coordinator.ledger.cli import app as ledger_app
from coordinator.market.cli import buyer_job_app
from coordinator.royalties.cli import recompute_settlement_command
from demo.cli import app as demo_app
from edge.agent.cli import app as agent_app
from midgate_errors import exit_if_expected


class MidgateApp(typer.Typer):
    """The top-level app: runs a command and says an expected error in one line (midgate_errors)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except (KeyboardInterrupt, Exception) as error:
            exit_if_expected(error)
            raise


app = MidgateApp(
    no_args_is_help=True, help="midgate: federated data-pool gateway for MIDs.", pretty_exceptions_show_locals=False
)
app.add_typer(agent_app, name="agent")
app.add_typer(coordinator_app, name="coordinator")
# A buyer's jobs through the signed API: the market's client, mounted here (coordinator.buyer sits below it).
buyer_app.add_typer(buyer_job_app, name="job")
app.add_typer(buyer_app, name="buyer")
# The auditor's commands read only the ledger; recompute-settlement is the royalty component's, so it is mounted here
# rather than imported by the ledger's CLI (the ledger sits below money: pyproject's import-linter contract).
ledger_app.command("recompute-settlement")(recompute_settlement_command)
app.add_typer(ledger_app, name="ledger")
app.add_typer(demo_app, name="demo")
