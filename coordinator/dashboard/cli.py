"""`midgate coordinator operator passwd` (the dashboard's login) and `midgate coordinator job report` (a job's HTML
report). Mounted by coordinator/cli.py: the job commands' module sits below the dashboard in the layers.

Imports live inside the commands: every `midgate` invocation (the agent's too) imports the CLI modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

operator_app = typer.Typer(no_args_is_help=True, help="The operator's login to the dashboard (`/operator`).")

HtmlOption = typer.Option(..., "--html", dir_okay=False, help="the HTML file to write")
ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")


@operator_app.command()
def passwd(
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="read the password from the first line of stdin instead of prompting"
    ),
    config: Path | None = ConfigOption,
) -> None:
    """Set the operator's dashboard password (at least 12 characters): its scrypt hash goes to data_dir/
    operator-password (0600). A running `serve` uses it at the next login; sessions already open stay open."""
    from coordinator.config import CoordinatorSettings
    from coordinator.dashboard.auth import set_operator_password

    settings = CoordinatorSettings.load_for_command(config)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("operator password", hide_input=True, confirmation_prompt=True)
    set_operator_password(settings.operator_password_path, password)
    typer.echo(f"operator password set ({settings.operator_password_path})")


def report_command(
    job_id: str = typer.Argument(..., help="the job's id"),
    html: Path = HtmlOption,
    baseline_accuracy: float | None = typer.Option(
        None, min=0.0, max=1.0, help="an accuracy to chart beside the job's, e.g. central training's"
    ),
    baseline_label: str = typer.Option("central baseline", help="what the baseline accuracy is"),
    config: Path | None = ConfigOption,
) -> None:
    """Write one self-contained HTML file about a logged job: accuracy per round (beside a baseline if given), value
    per member per round, payouts and royalties, ledger growth. Read from the ledger and the job book; no network."""
    from coordinator.config import CoordinatorSettings
    from coordinator.dashboard.report import Baseline, JobNotLoggedError, build_job_report, render_job_report
    from coordinator.federation.job_start import JobBook

    settings = CoordinatorSettings.load_for_command(config)
    baseline = None if baseline_accuracy is None else Baseline(baseline_label, baseline_accuracy)
    try:
        report = build_job_report(settings.ledger_path, JobBook(settings.job_book_dir), settings.mid, job_id, baseline)
    except JobNotLoggedError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    html.write_text(render_job_report(report), encoding="utf-8")
    typer.echo(f"job report written to {html}")
