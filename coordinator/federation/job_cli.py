"""`midgate coordinator job ...`: run a training job on the MID's SuperLink, and list or show the jobs it ran.

Imports live inside the commands: every `midgate` invocation (the agent's too) imports the CLI modules.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from coordinator.config import CoordinatorSettings
    from coordinator.federation.job_start import JobBook, JobRecord, JobRequest
    from coordinator.policy.document import MidPolicy
    from protocol.tasks.spec import TaskSpec

app = typer.Typer(no_args_is_help=True, help="Training jobs on the MID's Flower SuperLink (`serve` runs it).")

ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")
DeviceOption = typer.Option(
    None, "--device", "-d", help="a device id to train on (repeat); none: every device that connects (all online)"
)
ValidationOption = typer.Option(..., exists=True, dir_okay=False, help="the buyer's validation window file")


def _settings(config: Path | None) -> CoordinatorSettings:
    from coordinator.config import CoordinatorSettings

    return CoordinatorSettings.load_for_command(config)


def _book(settings: CoordinatorSettings) -> JobBook:
    from coordinator.federation.job_start import JobBook

    return JobBook(settings.job_book_dir)


RECIPE_HELP = "default: the task's recipe (docs/federated.md, Defaults)"


@app.command()
def start(
    job_id: str = typer.Argument(..., help="the job's id ([a-z0-9-]), unique on this MID"),
    task: str = typer.Option(..., help="task id and version, e.g. plaid-appliance@1"),
    rounds: int | None = typer.Option(None, help=f"federated rounds; {RECIPE_HELP}"),
    device: list[str] | None = DeviceOption,
    min_nodes: int = typer.Option(2, help="fewest usable updates per round"),
    round_timeout: float = typer.Option(120.0, help="seconds to wait for a round's replies"),
    join_timeout: float = typer.Option(60.0, help="seconds to wait for invited SuperNodes to connect"),
    validation: Path = ValidationOption,
    purpose: str = typer.Option(..., help="what the data is used for ([a-z0-9-])"),
    buyer: str = typer.Option(..., help="the buyer's id ([a-z0-9-])"),
    local_epochs: int | None = typer.Option(None, help=f"local epochs per round; {RECIPE_HELP}"),
    batch_size: int | None = typer.Option(None, help=f"the devices' minibatch size; {RECIPE_HELP}"),
    lr: float | None = typer.Option(None, help=f"the devices' base learning rate (Adam); {RECIPE_HELP}"),
    dp_clipping_norm: float = typer.Option(0.0, help="differential privacy: client-side clipping norm (0: off)"),
    dp_noise_multiplier: float = typer.Option(0.0, help="differential privacy: Gaussian noise multiplier"),
    dp_delta: float = typer.Option(1e-5, help="differential privacy: delta the spent epsilon is reported at"),
    server_momentum: float | None = typer.Option(
        None, help=f"FedAvgM server momentum (0: plain FedAvg); {RECIPE_HELP}"
    ),
    drift_correction: float | None = typer.Option(
        None, help=f"drift correction strength in [0, 1] (a gradient query per round; not with DP); {RECIPE_HELP}"
    ),
    lr_schedule: str | None = typer.Option(
        None, help=f"client lr over the rounds: constant, cosine or late-cosine; {RECIPE_HELP}"
    ),
    tail_average: int | None = typer.Option(
        None, help=f"the final model is the mean of the last K rounds' global models; {RECIPE_HELP}, at most --rounds"
    ),
    attribution: bool = typer.Option(True, help="value every round on the validation set (needed to settle the job)"),
    aggregation: str = typer.Option(
        "fedavg", help="fedavg, or Flower's robust fedmedian, fedtrimmedavg, krum or bulyan (not with DP or momentum)"
    ),
    lease: float = typer.Option(120.0, help="seconds a device keeps its SuperNode after the latest invitation"),
    config: Path | None = ConfigOption,
) -> None:
    """Invite the devices (signed RoundInvitations), run the job on the SuperLink, re-invite while it runs, and
    print its outcome, its model version and the ledger leaves `serve` logged it in. Exits 0 only when the run
    finished:completed with every round."""
    from pydantic import ValidationError
    from rich.console import Console

    from coordinator.federation.control_api import RunControlError
    from coordinator.federation.job_start import JobRequest, JobRequestError
    from coordinator.policy.in_force import policy_in_force
    from protocol.errors import ProtocolError
    from protocol.settings import validation_problems

    console = Console(stderr=False, highlight=False, soft_wrap=True)  # a line a line, also in a log file
    task_id, _, version = task.partition("@")
    settings = _settings(config)
    try:
        spec = _catalogue_task(settings, task_id, version)
        request = JobRequest.model_validate(
            {
                "job_id": job_id,
                "task_id": task_id,
                "task_version": int(version or "0"),
                "rounds": rounds,
                "devices": tuple(device or ()),
                "min_nodes": min_nodes,
                "round_timeout_s": round_timeout,
                "join_timeout_s": join_timeout,
                "validation_path": validation,
                "purpose": purpose,
                "buyer": buyer,
                "local_epochs": local_epochs,
                "batch_size": batch_size,
                "lr": lr,
                "dp_clipping_norm": dp_clipping_norm,
                "dp_noise_multiplier": dp_noise_multiplier,
                "dp_delta": dp_delta,
                "server_momentum": server_momentum,
                "drift_correction": drift_correction,
                "lr_schedule": lr_schedule,
                "tail_average": tail_average,
                "attribution": attribution,
                "aggregation": aggregation,
                "lease_s": lease,
            },
            context={"task": spec},
        )
        # A job is purpose-bound: the purpose must be in the vocabulary of the policy in force (policy_violation).
        policy = policy_in_force(settings)[0]
        policy.purpose(purpose)
    except ValidationError as error:
        typer.echo(f"job refused: {validation_problems(error)}", err=True)
        raise typer.Exit(2) from None
    except (ValueError, KeyError, LookupError, ProtocolError) as error:
        typer.echo(f"job refused: {error}", err=True)
        raise typer.Exit(2) from None
    if not settings.federation.enabled:
        typer.echo("job refused: [federation] enabled = false in this coordinator's config", err=True)
        raise typer.Exit(2)
    ledger_size = _ledger_size(settings)
    try:
        record = _run(settings, request, spec, console, policy)
    except JobRequestError as error:
        verdict = "refused" if error.reason == "strike" else "failed"
        typer.echo(f"job {verdict}: {error}", err=True)
        raise typer.Exit(2 if verdict == "refused" else 1) from None
    except (RunControlError, OSError) as error:  # OSError: no broker, no MID CA yet
        typer.echo(f"job failed: {' '.join(str(error).split())}", err=True)  # the SuperLink's answer, on one line
        raise typer.Exit(1) from None
    _print_outcome(console, record)
    if record.status in ("completed", "failed"):
        _print_logged(console, settings, record, ledger_size)
    # Everything is written and closed: spare the exit the interpreter's last collection over Flower's imports
    # (0.5 s of the command's end measured; 0.1 s with it frozen).
    gc.freeze()
    raise typer.Exit(0 if record.status == "completed" else 1)


def _catalogue_task(settings: CoordinatorSettings, task_id: str, version: str) -> TaskSpec | None:
    """The job's spec from the MID's task catalogue (what devices will fetch); None when the version is not a number
    (the request's validation says why). Raises UnknownTaskError naming the tasks the catalogue has."""
    from coordinator.tasks.cli import open_catalogue

    if not version.isdecimal():
        return None
    with open_catalogue(settings) as catalogue:
        return catalogue.get(task_id, int(version)).spec


def _ledger_size(settings: CoordinatorSettings) -> int:
    """The ledger's size now: leaves appended later are looked for from here (0 when there is no ledger yet)."""
    from coordinator.ledger.store import LedgerReader

    if not settings.ledger_path.exists():
        return 0
    with LedgerReader.open_existing(settings.ledger_path) as reader:
        return reader.size


def _print_logged(console: Console, settings: CoordinatorSettings, record: JobRecord, start: int) -> None:
    """Wait (bounded) for `serve` to log the job, then say where; the job's result does not depend on it."""
    from coordinator.federation.job_ledger import is_job_leaf, wait_for_leaf

    index = wait_for_leaf(settings.ledger_path, is_job_leaf(record.request.job_id), LOGGED_WAIT_S, start=start)
    if index is None:
        console.print(f"not in the ledger after {LOGGED_WAIT_S:.0f} s: `coordinator serve` logs it when it runs")
        return
    console.print(f"logged: JOB leaf {index}, then one ROUND leaf per captured round")


LOGGED_WAIT_S = 30.0
"""How long `job start` and `job settle` wait for `serve` to append what they recorded (it looks every 0.25 s)."""


@app.command()
def settle(
    job_id: str = typer.Argument(..., help="a completed job of this MID"),
    payment: int = typer.Option(..., min=0, help="the buyer's payment in integer minor units (e.g. cents)"),
    currency: str = typer.Option(..., help="ISO 4217 code; must be the MID's ([royalties] currency)"),
    timeout: float = typer.Option(LOGGED_WAIT_S, help="seconds to wait for `serve` to append the settlement"),
    config: Path | None = ConfigOption,
) -> None:
    """Record the buyer's payment for a completed job (until the buyer API takes payments); `serve` settles it
    under the MID's policy (fee at most the cap, the rest to members by the job's attribution) and appends the
    SETTLEMENT leaf. Prints the leaf's index and the split, and issues the job's provenance manifest (`job manifest`
    writes it out). A job is paid once: repeating the same payment waits for the same settlement, another amount is
    refused."""
    from coordinator.federation.job_ledger import is_settlement_leaf, wait_for_leaf
    from coordinator.federation.job_start import JobPayment

    settings = _settings(config)
    book = _book(settings)
    record = book.read(job_id)
    refusal = _settle_refusal(settings, record, currency)
    if refusal:
        typer.echo(f"settlement refused: {refusal}", err=True)
        raise typer.Exit(2)
    start = _ledger_size(settings)
    asked = JobPayment(job_id=job_id, payment_minor=payment, currency=currency, recorded_ms=_now_ms())
    if book.payment(job_id) is not None:
        start = 0  # recorded before: it may be settled already
    recorded = book.record_payment(asked)
    if (recorded.payment_minor, recorded.currency) != (payment, currency):
        typer.echo(
            f"settlement refused: job {job_id} already has a payment of {recorded.payment_minor} {recorded.currency}",
            err=True,
        )
        raise typer.Exit(2)
    index = wait_for_leaf(settings.ledger_path, is_settlement_leaf(job_id), timeout, start=start)
    if index is None:
        typer.echo(
            f"payment recorded; not settled after {timeout:.0f} s: `coordinator serve` settles it when it runs"
            " (its log says why it did not)",
            err=True,
        )
        raise typer.Exit(1)
    _print_settlement(settings, index)
    _issue_manifest(settings, job_id)


def _issue_manifest(settings: CoordinatorSettings, job_id: str) -> None:
    """Issue the settled job's provenance manifest (kept in data_dir/manifests; `job manifest` writes it out). The
    settlement stands whether or not this works: a failure is one line, and `job manifest` tries again."""
    from coordinator.provenance.issue import issue_manifest
    from protocol.errors import ProtocolError
    from protocol.provenance import manifest_reference, read_manifest_unverified

    try:
        envelope = issue_manifest(settings, job_id)
    except (ProtocolError, OSError) as error:
        typer.echo(f"manifest not issued: {error}", err=True)
        return
    reference = manifest_reference(read_manifest_unverified(envelope))
    typer.echo(f"manifest issued: {reference} (`midgate coordinator job manifest {job_id} --out FILE` writes it)")


def _settle_refusal(settings: CoordinatorSettings, record: JobRecord | None, currency: str) -> str:
    """Why a payment cannot be recorded for this job, or "" when it can."""
    if record is None:
        return "no such job"
    if record.status != "completed" or record.model_version is None:
        return f"the job is {record.status}, not completed: it has no model to pay for"
    if not record.request.attribution:
        return "the job ran without attribution: there is nothing to split its payment by"
    if currency != settings.royalties.currency:
        return f"policy_violation: the MID settles in {settings.royalties.currency}, not {currency}"
    return ""


def _print_settlement(settings: CoordinatorSettings, index: int) -> None:
    from coordinator.ledger.store import LedgerReader
    from coordinator.royalties.settlement import decode_record
    from protocol.leaves import decode_leaf

    with LedgerReader.open_existing(settings.ledger_path) as reader:
        record = decode_record(decode_leaf(reader.leaf(index)).signed)
    inputs = record.inputs
    typer.echo(
        f"settled: SETTLEMENT leaf {index}, record {inputs.record_id}, model version {inputs.attribution.model_version}"
    )
    policy = inputs.attribution.policy
    typer.echo(
        f"payment {inputs.payment_minor} {inputs.currency}: fee {record.fee_minor} (policy v{policy.version}, fee"
        f" {policy.fee_bps} bps), members {record.pool_minor - record.unallocated_minor},"
        f" unallocated {record.unallocated_minor}"
    )
    typer.echo("member\tamount\treason\tvalue_units")
    values = {m.member: m.value_units for m in inputs.attribution.members}
    for payout in record.payouts:
        typer.echo(f"{payout.member}\t{payout.amount_minor}\t{payout.reason}\t{values[payout.member]}")


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def _run(
    settings: CoordinatorSettings,
    request: JobRequest,
    spec: TaskSpec | None,
    console: Console,
    policy: MidPolicy,
) -> JobRecord:
    """Run the job under `policy`, the MID policy in force: its `[strikes]`, and its `[reputation]` minimum for the
    job's purpose against the members' reputation in the ledger."""
    import functools

    from coordinator.federation.job_start import APP_DIR, InvitationSender, JobRun
    from coordinator.federation.mid_superlink import job_broker_login, job_control_api
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.policy.reputation import logged_scores
    from coordinator.registry.store import Registry

    s = settings
    strikes = policy.strikes
    login = job_broker_login(s, request.job_id)
    control = job_control_api(s)
    control.prepare(APP_DIR)  # Flower's imports and the FAB, while the broker connects and the devices are invited
    registry = Registry(s.registry_path)
    try:
        with InvitationSender(login) as sender:
            run = JobRun(
                request=request,
                registry=registry,
                mid_key=load_or_create_mid_key(s.mid_key_file, s.mid),
                mid=s.mid,
                control=control,
                sender=sender,
                jobs_dir=s.jobs_dir,
                book=_book(s),
                report=lambda line: console.print(f"[cyan]{request.job_id}[/cyan] {line}"),
                offline_after_s=s.ingest.heartbeat_offline_s,
                flower_acceleration=s.federation.flower_acceleration,
                one_player_per_member=s.federation.one_player_per_member,
                task=spec,
                strike_quorum_bps=strikes.quorum_bps,
                strike_min_members=strikes.min_members,
                strike_stops_running=strikes.running_jobs == "stop",
                reputation=(policy, functools.partial(logged_scores, s.ledger_path)),
            )
            with console.status(f"job {request.job_id}: {request.task_id}@{request.task_version}"):
                return run.run()
    finally:
        control.close()
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
    if outcome.final_validation:
        tail = record.request.tail_average
        averaged = f" (mean of the last {tail} rounds)" if tail > 1 else ""
        shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(outcome.final_validation.items()))
        console.print(f"final model{averaged} on the buyer's validation set: {shown}")
    for drop in outcome.drops:
        console.print(f"dropped: round {drop.round} node {drop.node_id}: {drop.reason} {drop.detail}".rstrip())
    if outcome.attribution:
        devices = {str(d.node_id): d for d in record.invited}
        table = Table("device", "member", "value (nano-units)", "rounds", "excluded", "screens", title="attribution")
        for node, units in sorted(outcome.attribution.items(), key=lambda item: -item[1]):
            history = outcome.attribution_history.get(node)
            device = devices.get(node)
            table.add_row(
                device.device_id if device else node,
                device.member_id if device else "?",
                str(units),
                str(history.rounds if history else "-"),
                str(history.excluded_rounds if history else "-"),
                ", ".join(history.screens) if history else "",
            )
        console.print(table)
    if record.model_version:
        console.print(f"model version: {record.model_version}")


@app.command("list")
def list_jobs(config: Path | None = ConfigOption) -> None:
    """The jobs this MID ran, one a line under a header (tab-separated): id, status, task, rounds, run id, reason,
    final validation accuracy, model version."""
    records = list(_book(_settings(config)).records())
    if not records:
        typer.echo("no jobs yet (`midgate coordinator job start` runs one)")
        return
    typer.echo("job\tstatus\ttask\trounds\trun\treason\taccuracy\tmodel_version")
    for record in records:
        r = record.request
        accuracy = ""
        if record.outcome is not None and record.outcome.validation:
            last = record.outcome.validation[max(record.outcome.validation)]
            accuracy = f"{last.get('accuracy', float('nan')):.4f}" if "accuracy" in last else ""
        typer.echo(
            f"{r.job_id}\t{record.status}\t{r.task_id}@{r.task_version}\t"
            f"{record.rounds_completed}/{r.rounds}\t{record.run_id or '-'}\t{record.reason or '-'}\t{accuracy or '-'}\t"
            f"{record.model_version or '-'}"
        )


@app.command()
def show(job_id: str = typer.Argument(...), config: Path | None = ConfigOption) -> None:
    """One job's full record (request, invited devices, run, outcome, `model_version`) as JSON, and its payment
    when `job settle` recorded one."""
    record = _book(_settings(config)).read(job_id)
    if record is None:
        typer.echo(f"no job {job_id}", err=True)
        raise typer.Exit(1)
    shown = record.model_dump(mode="json")
    payment = _book(_settings(config)).payment(job_id)
    if payment is not None:
        shown["payment"] = payment.model_dump(mode="json")
    typer.echo(json.dumps(shown, indent=1))


def _mount_manifest() -> None:
    # The manifest command lives with the manifests (coordinator/provenance); `job` is where an operator looks for it.
    from coordinator.provenance.cli import manifest

    app.command("manifest")(manifest)


_mount_manifest()
