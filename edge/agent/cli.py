"""`midgate agent` commands."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from edge.agent.sensors_cli import app as sensors_app

app = typer.Typer(
    no_args_is_help=True,
    help="Member commands: enrol, run the agent daemon, sensors; pause, resume, leave, strike, unstrike, status.",
)
app.add_typer(sensors_app, name="sensors")

if TYPE_CHECKING:
    from edge.agent.config import AgentSettings
    from edge.agent.controls.commands import Transition
    from edge.agent.controls.state import MemberState as StateOfMember


ConfigOption = typer.Option(None, "--config", "-c", help="agent.toml (env MIDGATE_AGENT_* overrides)")
MidOption = typer.Option(..., "--mid", help="the MID's enrolment URL, e.g. https://mid.example.org")
InviteOption = typer.Option(..., "--invite", help="the invite token the MID operator gave you")


@app.command()
def enrol(mid: str = MidOption, invite: str = InviteOption, config: Path | None = ConfigOption) -> None:
    """Join a MID: make a key for it alone, prove possession, receive broker credentials and an enrolment receipt."""
    from edge.agent.config import AgentSettings
    from edge.agent.enrolment import enrol as enrol_with

    record = enrol_with(AgentSettings.load(config), mid, invite)
    typer.echo(f"enrolled in {record.mid} as device {record.device} (member {record.member})")


@app.command()
def run(config: Path | None = ConfigOption) -> None:
    """Run the agent daemon for every MID this agent belongs to (until SIGTERM/SIGINT)."""
    from edge.agent.run import run_daemon

    run_daemon(config)


# --- member controls (edge.agent.controls.commands): work whether the daemon runs or not ------------------------------

MidNameOption = typer.Option(None, "--mid", help="the MID (as under data_dir/mids); default: every membership")
_PICKUP = "a running agent applies it within member_poll_s seconds; a stopped one when it starts"


def _chosen(settings: AgentSettings, mid: str | None) -> list[Path]:
    """The membership folders a command applies to; an unknown `--mid` (or none enrolled) exits 2 with one line."""
    from rich.console import Console

    from edge.agent.controls.commands import membership_dirs

    try:
        return membership_dirs(settings, mid)
    except ValueError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]{exc}[/red]")
        raise typer.Exit(code=2) from None


def _control(config: Path | None, mid: str | None, transition: Transition, done: str) -> None:
    """Apply one member transition to the chosen memberships; print each outcome; exit 1 if any was refused."""
    from rich.console import Console

    from edge.agent.config import AgentSettings
    from edge.agent.controls.commands import apply, now_ms
    from edge.agent.controls.state import MemberControlError
    from edge.agent.controls.watch import describe

    console, errors = Console(), Console(stderr=True, soft_wrap=True)  # an error is one line
    refused = 0
    for directory in _chosen(AgentSettings.load(config), mid):
        try:
            result = apply(directory, transition)
        except MemberControlError as exc:
            refused += 1
            errors.print(f"[red]{directory.name}: refused: {exc}[/red]")
            continue
        what = done if result.changed else "unchanged"
        console.print(f"[bold]{result.mid}[/bold]: {what} -> {describe(result.after, now_ms())}")
    if refused:
        raise typer.Exit(code=1)
    console.print(f"[dim]{_PICKUP}[/dim]")


@app.command()
def pause(mid: str | None = MidNameOption, config: Path | None = ConfigOption) -> None:
    """Stop taking part in jobs until `resume`: a running job's SuperNode stops, new invitations are declined,
    heartbeats say paused. Kept across reboots."""
    from edge.agent.controls.state import pause as pause_state

    _control(config, mid, pause_state, "paused")


@app.command()
def resume(mid: str | None = MidNameOption, config: Path | None = ConfigOption) -> None:
    """Take part in jobs again after `pause` (strikes stay as they are)."""
    from edge.agent.controls.state import resume as resume_state

    _control(config, mid, resume_state, "resumed")


@app.command()
def leave(
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
) -> None:
    """Leave the MID for good: no more jobs or heartbeats; reports already made are still delivered and paid."""
    from edge.agent.controls.state import leave as leave_state

    if not yes:
        typer.confirm(f"Leave {mid or 'every MID'} for good? This cannot be undone on this device", abort=True)
    _control(config, mid, leave_state, "left")


@app.command()
def strike(
    buyer: str | None = typer.Option(None, "--buyer", help="strike against this buyer"),
    purpose: str | None = typer.Option(None, "--purpose", help="strike against this purpose (with --buyer: both)"),
    until: str | None = typer.Option(None, "--until", help="end (ISO 8601, UTC if no zone); default: until unstrike"),
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Join a data strike: the agent signs a StrikeVote for the MID's ledger and declines the target's jobs."""
    from edge.agent.controls.commands import parse_until
    from edge.agent.controls.state import MemberState
    from edge.agent.controls.state import strike as strike_state

    try:
        end_ms = parse_until(until)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None

    def step(state: MemberState, now: int) -> MemberState:
        return strike_state(state, now, buyer, purpose, end_ms)[0]

    _control(config, mid, step, "striking")


@app.command()
def unstrike(
    buyer: str | None = typer.Option(None, "--buyer", help="withdraw strikes against this buyer"),
    purpose: str | None = typer.Option(None, "--purpose", help="withdraw strikes against this purpose"),
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Withdraw strikes (all active ones, or those matching --buyer/--purpose): the agent signs the withdrawal."""
    from edge.agent.controls.state import MemberState
    from edge.agent.controls.state import unstrike as unstrike_state

    def step(state: MemberState, now: int) -> MemberState:
        return unstrike_state(state, now, buyer, purpose)[0]

    _control(config, mid, step, "strike withdrawn")


knob_app = typer.Typer(no_args_is_help=True, help="The one price knob: get it, or set it in [-1, 1].")
app.add_typer(knob_app, name="knob")


def _knob_milli(value: str) -> int:
    """`0.25`, `-1`, `+0.5` -> milli-units; BadParameter outside [-1, 1] or finer than a thousandth."""
    from decimal import Decimal, InvalidOperation

    try:
        number = Decimal(value)
    except InvalidOperation:
        raise typer.BadParameter(f"the knob is a number in [-1, 1], found {value!r}") from None
    milli = number * 1000
    if not number.is_finite() or milli != milli.to_integral_value() or not -1000 <= milli <= 1000:
        raise typer.BadParameter(f"the knob is a number in [-1, 1] in steps of 0.001, found {value!r}")
    return int(milli)


def _show_knob(directory: Path) -> None:
    """One line per membership: the knob, and what it means under the MID's policy (asked of the MID)."""
    from edge.agent.controls.shown import knob_line
    from edge.agent.membership import load_membership

    typer.echo(knob_line(directory, load_membership(directory).record.enrolment_url))


@knob_app.command("get")
def knob_get(mid: str | None = MidNameOption, config: Path | None = ConfigOption) -> None:
    """Show the knob of each membership and the price per job it yields under the MID's policy."""
    from edge.agent.config import AgentSettings

    for directory in _chosen(AgentSettings.load(config), mid):
        _show_knob(directory)


@knob_app.command("set")
def knob_set(
    value: str = typer.Argument(..., help="in [-1, 1]: -1 asks the MID's lowest price, +1 its highest, 0 its base"),
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Set the price knob: the agent signs a KnobUpdate for the MID's ledger; quotes use it from the next job."""
    from edge.agent.config import AgentSettings
    from edge.agent.controls.state import MemberState, set_knob

    milli = _knob_milli(value)

    def step(state: MemberState, now: int) -> MemberState:
        return set_knob(state, now, milli)

    _control(config, mid, step, "knob set")
    for directory in _chosen(AgentSettings.load(config), mid):
        _show_knob(directory)


consent_app = typer.Typer(
    no_args_is_help=True, help="Consent: which purposes your data may train models for, which buyers never."
)
app.add_typer(consent_app, name="consent")
PurposeOption = typer.Option([], "--purpose", help="a purpose from the MID's vocabulary (repeat for more)")
BuyerOption = typer.Option([], "--buyer", help="a buyer (repeat for more)")


@consent_app.command("show")
def consent_show(
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
    format: str = typer.Option(
        "text", "--format", help="text, or 27560: one ISO/IEC TS 27560 consent record (JSON) per membership"
    ),
) -> None:
    """Show the consent of each membership and where its signed ConsentPolicy is (queued, receipted)."""
    from edge.agent.config import AgentSettings
    from edge.agent.controls.shown import consent_line
    from edge.agent.controls.state import load_member_state

    if format not in ("text", "27560"):
        raise typer.BadParameter("text or 27560", param_hint="--format")
    for directory in _chosen(AgentSettings.load(config), mid):
        if format == "27560":
            _print_consent_record(directory, load_member_state(directory))
            continue
        typer.echo(consent_line(directory))


def _print_consent_record(directory: Path, state: StateOfMember) -> None:
    """The membership's consent as a TS 27560 record, its purposes' DPV concepts asked of the MID (exit 1 when the
    MID cannot be asked: the record would name no concepts)."""
    import json

    from edge.agent.consent_record import consent_record
    from edge.agent.ledger_client import LedgerClient, ProofUnavailableError
    from edge.agent.membership import load_membership
    from protocol.errors import ProtocolError

    membership = load_membership(directory)
    try:
        vocabulary = LedgerClient(membership.record.enrolment_url).purposes().purposes
    except (ProofUnavailableError, ProtocolError) as exc:
        typer.echo(f"{directory.name}: cannot ask the MID for its purposes' DPV concepts: {exc}", err=True)
        raise typer.Exit(code=1) from None
    record = consent_record(membership.mid, membership.record.member, membership.device, state, vocabulary)
    typer.echo(json.dumps(record, sort_keys=True))


@consent_app.command("allow")
def consent_allow(
    purpose: list[str] = PurposeOption,
    buyer: list[str] = BuyerOption,
    any_purpose: bool = typer.Option(False, "--any-purpose", help="allow every purpose of the MID's vocabulary"),
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Allow purposes (the first one narrows "every purpose" to the ones you list) or stop denying buyers. Applies
    from the next job."""
    from edge.agent.controls.state import MemberState, allow, allow_every_purpose

    if not (purpose or buyer or any_purpose):
        raise typer.BadParameter("name a --purpose, a --buyer or --any-purpose")
    if purpose:
        _check_vocabulary(config, mid, purpose)

    def step(state: MemberState, now: int) -> MemberState:
        if any_purpose:
            state = allow_every_purpose(state, now)
        return allow(state, now, purpose, buyer)

    _control(config, mid, step, "consent changed")


def _check_vocabulary(config: Path | None, mid: str | None, purposes: list[str]) -> None:
    """Each purpose must be in the vocabulary of each chosen MID's policy in force (asked of the MID): exit 2
    naming the MID's purposes when one is not, exit 1 when the MID cannot be asked (nothing is changed)."""
    from edge.agent.config import AgentSettings
    from edge.agent.ledger_client import LedgerClient, ProofUnavailableError
    from edge.agent.membership import load_membership
    from protocol.errors import ProtocolError

    for directory in _chosen(AgentSettings.load(config), mid):
        try:
            listed = LedgerClient(load_membership(directory).record.enrolment_url).purposes()
        except (ProofUnavailableError, ProtocolError) as exc:
            typer.echo(f"{directory.name}: cannot check the MID's purposes now, nothing changed: {exc}", err=True)
            raise typer.Exit(code=1) from None
        codes = [p.code for p in listed.purposes]
        unknown = [p for p in purposes if p not in codes]
        if unknown:
            typer.echo(
                f"{directory.name}: not in the MID's purposes (policy v{listed.policy_version}): "
                f"{', '.join(unknown)}; its purposes: {', '.join(codes)}",
                err=True,
            )
            raise typer.Exit(code=2)


@consent_app.command("deny")
def consent_deny(
    purpose: list[str] = PurposeOption,
    buyer: list[str] = BuyerOption,
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Deny buyers, or withdraw purposes from the ones you allow. Applies from the next job."""
    from edge.agent.controls.state import MemberState, deny

    if not (purpose or buyer):
        raise typer.BadParameter("name a --purpose or a --buyer")

    def step(state: MemberState, now: int) -> MemberState:
        return deny(state, now, purpose, buyer)

    _control(config, mid, step, "consent changed")


TaskArgument = typer.Argument(help="a task id, e.g. env-forecast (every version of it)")
SensorArgument = typer.Argument(help="kinds of sensor, as tasks name their inputs' sources (simulated, bme280, linux)")


@consent_app.command("allow-sensor")
def consent_allow_sensor(
    task: str = TaskArgument,
    sensors: list[str] = SensorArgument,
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Let a task train on these kinds of sensor (the first one narrows "every sensor" to the ones you list). The
    agent cuts the task's windows only from them, and the MID does not select you for the task when none of them is
    a source of its inputs. Applies from the next job."""
    from edge.agent.controls.state import MemberState, allow_sensors

    def step(state: MemberState, now: int) -> MemberState:
        return allow_sensors(state, now, task, sensors)

    _control(config, mid, step, "consent changed")


@consent_app.command("deny-sensor")
def consent_deny_sensor(
    task: str = TaskArgument,
    sensors: list[str] = SensorArgument,
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Stop a task training on these kinds of sensor (with none left, the task gets no data of yours). Applies from
    the next job."""
    from edge.agent.controls.state import MemberState, deny_sensors

    def step(state: MemberState, now: int) -> MemberState:
        return deny_sensors(state, now, task, sensors)

    _control(config, mid, step, "consent changed")


@consent_app.command("every-sensor")
def consent_every_sensor(
    task: str = TaskArgument, mid: str | None = MidNameOption, config: Path | None = ConfigOption
) -> None:
    """Back to the default for a task: every sensor whose data fits its inputs. Applies from the next job."""
    from edge.agent.controls.state import MemberState, every_sensor

    def step(state: MemberState, now: int) -> MemberState:
        return every_sensor(state, now, task)

    _control(config, mid, step, "consent changed")


@app.command()
def status(mid: str | None = MidNameOption, config: Path | None = ConfigOption) -> None:
    """Show per MID the device, the daemon's connection to the MID (and why it failed), the outbox, the latest
    verified receipt and the jobs joined; what the member chose (paused or left, each strike and whether the MID has
    receipted its vote); and how each sensor samples (rate, last sample, errors by kind)."""
    from rich.console import Console

    from edge.agent.config import AgentSettings
    from edge.agent.controls.commands import agent_table, sensors_table, status_table

    settings = AgentSettings.load(config)
    directories = _chosen(settings, mid)
    console = Console(width=160)
    console.print(agent_table(directories))
    console.print(status_table(directories))
    console.print(sensors_table(settings))


# --- what the member can check on this device (docs/member.md, "Checking the MID") --------------------------------


@app.command()
def receipts(
    verify: bool = typer.Option(
        False, "--verify", help="also check each receipt against the MID's latest witnessed checkpoint (asks the MID)"
    ),
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """List every message the MID receipted (reports, strike votes, the enrolment), each proven offline from the
    envelope and receipt kept with it; with --verify also under the checkpoint a quorum of witnesses cosigned.
    Exit 1 if any receipt is refused or the witnessed checkpoint does not check out."""
    from rich.console import Console

    from edge.agent.config import AgentSettings
    from edge.agent.membership import load_membership
    from edge.agent.receipts import verify_membership_receipts

    settings = AgentSettings.load(config)
    console = Console(width=160)
    failed = False
    for directory in _chosen(settings, mid):
        report = verify_membership_receipts(load_membership(directory), settings.outbox_max_bytes, verify)
        console.print(report.table())
        for problem in report.problems:
            typer.echo(f"{directory.name}: {problem}", err=True)  # plain: a reason's details are no markup
        failed |= not report.ok
    if failed:
        raise typer.Exit(code=1)


@app.command()
def statement(
    since: str | None = typer.Option(None, "--since", help="period start (ISO 8601, UTC if no zone); default: all"),
    until: str | None = typer.Option(None, "--until", help="period end, exclusive (ISO 8601); default: none"),
    mid: str | None = MidNameOption,
    config: Path | None = ConfigOption,
) -> None:
    """Fetch the member's settlement and royalty lines from the MID (a request signed with the device key) and print
    them only after every line verified on this device: in the log under a checkpoint a quorum of witnesses cosigned,
    consistent with the device's own trusted checkpoint, read from the leaf itself. Exit 1 if anything is refused."""
    import time

    from rich.console import Console

    from edge.agent.config import AgentSettings
    from edge.agent.controls.commands import parse_until
    from edge.agent.ledger_client import ProofUnavailableError
    from edge.agent.membership import load_membership
    from edge.agent.statement import fetch_membership_statement, render_statement
    from protocol.errors import ProtocolError
    from protocol.messages import MAX_TIME_MS, MIN_TIME_MS

    settings = AgentSettings.load(config)
    directories = _chosen(settings, mid)
    try:
        start, end = parse_until(since) or MIN_TIME_MS, parse_until(until) or MAX_TIME_MS
        if not MIN_TIME_MS <= start < end <= MAX_TIME_MS:
            raise ValueError("--since must be before --until, both between 2020-01-01 and 2100-01-01")
    except ValueError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]{exc}[/red]")
        raise typer.Exit(code=2) from None
    failed = False
    for directory in directories:
        membership = load_membership(directory)
        try:
            verified = fetch_membership_statement(
                membership, settings.outbox_max_bytes, (start, end), time.time_ns() // 1_000_000
            )
        except ProofUnavailableError as exc:
            typer.echo(f"{membership.mid}: no statement: {exc}", err=True)
            failed = True
            continue
        except ProtocolError as exc:
            typer.echo(f"{membership.mid}: statement refused: {exc}", err=True)
            failed = True
            continue
        typer.echo(render_statement(membership.mid, membership.record.member, verified), nl=False)
    if failed:
        raise typer.Exit(code=1)


@app.command()
def portfolio(config: Path | None = ConfigOption) -> None:
    """Everything this member earns across its MIDs: each membership's settlement and royalty lines fetched with its
    own key and verified against its own MID's ledger (as `statement` does), totals per currency over the verified
    lines only. Exit 1 if any membership's statement is refused or cannot be fetched."""
    import time

    from edge.agent.config import AgentSettings
    from edge.agent.ledger_client import LedgerClient
    from edge.agent.membership import Membership, load_membership
    from edge.agent.outbox import Outbox
    from edge.agent.portfolio import collect, render_portfolio
    from edge.agent.statement import fetch_statement
    from protocol.ledger_api import VerifiedStatement
    from protocol.messages import MAX_TIME_MS, MIN_TIME_MS

    settings = AgentSettings.load(config)
    memberships = [load_membership(d) for d in _chosen(settings, None)]

    def fetch(membership: Membership) -> VerifiedStatement:
        outbox = Outbox(membership.outbox_path, settings.outbox_max_bytes)
        try:
            trusted = outbox.get_meta("trusted_checkpoint")
        finally:
            outbox.close()
        client = LedgerClient(membership.record.enrolment_url)
        return fetch_statement(membership, client, trusted, (MIN_TIME_MS, MAX_TIME_MS), time.time_ns() // 1_000_000)

    earnings = collect(memberships, fetch)
    typer.echo(render_portfolio(earnings), nl=False)
    if any(e.statement is None for e in earnings):
        raise typer.Exit(code=1)
