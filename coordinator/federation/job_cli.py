"""`midgate coordinator job ...`: run a training job on the MID's SuperLink, and list or show the jobs it ran.

Imports live inside the commands: every `midgate` invocation (the agent's too) imports the CLI modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from coordinator.config import CoordinatorSettings
    from coordinator.federation.job_start import JobBook, JobRecord, JobRequest

app = typer.Typer(no_args_is_help=True, help="Training jobs on the MID's Flower SuperLink (`serve` runs it).")

ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")
DeviceOption = typer.Option(
    None, "--device", "-d", help="a device id to train on (repeat); none: every device that connects (all online)"
)
ValidationOption = typer.Option(..., exists=True, dir_okay=False, help="the buyer's validation window file")


def _settings(config: Path | None) -> CoordinatorSettings:
    from coordinator.config import CoordinatorSettings
    from protocol.errors import ProtocolError

    try:
        return CoordinatorSettings.load(config)
    except ProtocolError as error:
        typer.echo(f"invalid config: {error}", err=True)
        raise typer.Exit(2) from None


def _book(settings: CoordinatorSettings) -> JobBook:
    from coordinator.federation.job_start import JobBook

    return JobBook(settings.job_book_dir)


@app.command()
def start(
    job_id: str = typer.Argument(..., help="the job's id ([a-z0-9-]), unique on this MID"),
    task: str = typer.Option(..., help="task id and version, e.g. plaid-appliance@1"),
    rounds: int = typer.Option(3, help="federated rounds"),
    device: list[str] | None = DeviceOption,
    min_nodes: int = typer.Option(2, help="fewest usable updates per round"),
    round_timeout: float = typer.Option(120.0, help="seconds to wait for a round's replies"),
    join_timeout: float = typer.Option(60.0, help="seconds to wait for invited SuperNodes to connect"),
    validation: Path = ValidationOption,
    purpose: str = typer.Option(..., help="what the data is used for ([a-z0-9-])"),
    buyer: str = typer.Option(..., help="the buyer's id ([a-z0-9-])"),
    local_epochs: int = typer.Option(1, help="local epochs per round"),
    dp_clipping_norm: float = typer.Option(0.0, help="differential privacy: client-side clipping norm (0: off)"),
    dp_noise_multiplier: float = typer.Option(0.0, help="differential privacy: Gaussian noise multiplier"),
    dp_delta: float = typer.Option(1e-5, help="differential privacy: delta the spent epsilon is reported at"),
    server_momentum: float = typer.Option(0.0, help="FedAvgM server momentum (0: plain FedAvg)"),
    drift_correction: float = typer.Option(
        0.0, help="drift correction strength in [0, 1] (a gradient query per round; not with DP)"
    ),
    lr_schedule: str = typer.Option(
        "constant", help="client lr over the rounds: constant, cosine or late-cosine (protocol.tasks.schedule)"
    ),
    tail_average: int = typer.Option(1, help="the final model is the mean of the last K rounds' global models"),
    lease: float = typer.Option(120.0, help="seconds a device keeps its SuperNode after the latest invitation"),
    config: Path | None = ConfigOption,
) -> None:
    """Invite the devices (signed RoundInvitations), run the job on the SuperLink, re-invite while it runs, and
    print its outcome. Exits 0 only when the run finished:completed with every round."""
    from pydantic import ValidationError
    from rich.console import Console

    from coordinator.federation.flower_cli import FlowerCliError
    from coordinator.federation.job_start import JobRequest, JobRequestError

    console = Console(stderr=False, highlight=False)
    task_id, _, version = task.partition("@")
    try:
        request = JobRequest(
            job_id=job_id,
            task_id=task_id,
            task_version=int(version or "0"),
            rounds=rounds,
            devices=tuple(device or ()),
            min_nodes=min_nodes,
            round_timeout_s=round_timeout,
            join_timeout_s=join_timeout,
            validation_path=validation,
            purpose=purpose,
            buyer=buyer,
            local_epochs=local_epochs,
            dp_clipping_norm=dp_clipping_norm,
            dp_noise_multiplier=dp_noise_multiplier,
            dp_delta=dp_delta,
            server_momentum=server_momentum,
            drift_correction=drift_correction,
            lr_schedule=lr_schedule,
            tail_average=tail_average,
            lease_s=lease,
        )
    except (ValidationError, ValueError, KeyError, LookupError) as error:
        console.print(f"[red]job refused[/red]: {error}")
        raise typer.Exit(2) from None
    settings = _settings(config)
    if not settings.federation.enabled:
        console.print("[red]job refused[/red]: \\[federation] enabled = false in this coordinator's config")
        raise typer.Exit(2)
    try:
        record = _run(settings, request, console)
    except (JobRequestError, FlowerCliError, OSError) as error:  # OSError: no broker, no MID CA yet
        console.print(f"[red]job failed[/red]: {error}")
        raise typer.Exit(1) from None
    _print_outcome(console, record)
    raise typer.Exit(0 if record.status == "completed" else 1)


def _run(settings: CoordinatorSettings, request: JobRequest, console: Console) -> JobRecord:
    from coordinator.broker.logins import coordinator_password, coordinator_password_path
    from coordinator.federation.job_start import BrokerLogin, InvitationSender, JobRun
    from coordinator.federation.mid_superlink import job_flower_cli
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.registry.store import Registry

    s = settings
    login = BrokerLogin(
        host=s.broker.host,
        port=s.broker.port,
        username=s.broker.username,
        password=coordinator_password(coordinator_password_path(s)),
        client_id=f"{s.broker.client_id}-job-{request.job_id}",
        ca_file=str(s.broker.ca_file) if s.broker.tls and s.broker.ca_file else None,
        mqtt5=s.broker.mqtt5,
    )
    registry = Registry(s.registry_path)
    try:
        with InvitationSender(login) as sender:
            run = JobRun(
                request=request,
                registry=registry,
                mid_key=load_or_create_mid_key(s.mid_key_file, s.mid),
                mid=s.mid,
                cli=job_flower_cli(s),
                sender=sender,
                jobs_dir=s.jobs_dir,
                book=_book(s),
                report=lambda line: console.print(f"[cyan]{request.job_id}[/cyan] {line}"),
                flower_acceleration=s.federation.flower_acceleration,
            )
            with console.status(f"job {request.job_id}: {request.task_id}@{request.task_version}"):
                return run.run()
    finally:
        registry.close()


def _print_outcome(console: Console, record: JobRecord) -> None:
    from rich.table import Table

    style = "green" if record.status == "completed" else "red"
    reason = f" ({record.reason})" if record.reason else ""
    console.print(
        f"job {record.request.job_id}: [{style}]{record.status}[/{style}]{reason}; run {record.run_id}, "
        f"SuperLink status {record.flower_status or '-'}, rounds {record.rounds_completed}/{record.request.rounds}"
    )
    outcome = record.outcome
    if outcome is None:
        return
    if outcome.validation:
        table = Table("round", *sorted(next(iter(outcome.validation.values()))), title="validation (buyer's set)")
        for server_round, metrics in sorted(outcome.validation.items()):
            table.add_row(str(server_round), *(f"{metrics[k]:.4f}" for k in sorted(metrics)))
        console.print(table)
    for drop in outcome.drops:
        console.print(f"dropped: round {drop.round} node {drop.node_id}: {drop.reason} {drop.detail}".rstrip())


@app.command("list")
def list_jobs(config: Path | None = ConfigOption) -> None:
    """The jobs this MID ran: id, status, task, rounds, run id, final validation accuracy."""
    for record in _book(_settings(config)).records():
        r = record.request
        accuracy = ""
        if record.outcome is not None and record.outcome.validation:
            last = record.outcome.validation[max(record.outcome.validation)]
            accuracy = f"{last.get('accuracy', float('nan')):.4f}" if "accuracy" in last else ""
        typer.echo(
            f"{r.job_id}\t{record.status}\t{r.task_id}@{r.task_version}\t"
            f"{record.rounds_completed}/{r.rounds}\trun={record.run_id}\t{record.reason or '-'}\t{accuracy}"
        )


@app.command()
def show(job_id: str = typer.Argument(...), config: Path | None = ConfigOption) -> None:
    """One job's full record (request, invited devices, run, outcome) as JSON."""
    record = _book(_settings(config)).read(job_id)
    if record is None:
        typer.echo(f"no job {job_id}", err=True)
        raise typer.Exit(1)
    typer.echo(record.model_dump_json(indent=1))
