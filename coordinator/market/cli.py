"""`midgate coordinator buyer add|revoke|list` (the operator registers buyers), `midgate coordinator task proposals|
approve JOB` (task specs buyers proposed with a job request) and `midgate buyer job ...` (a buyer's jobs through the
signed API).

Imports live inside the commands: every `midgate` invocation (the agent's too) imports the CLI modules.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from coordinator.market.client import BuyerClient

operator_app = typer.Typer(
    no_args_is_help=True,
    help="Buyers allowed to use the buyer job API (effective at once: `serve` reads them at every request).",
)
buyer_job_app = typer.Typer(no_args_is_help=True, help="Training jobs through the MID's buyer API, every call signed.")

ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@operator_app.command("add")
def add_buyer(
    name: Annotated[str, typer.Argument(help="the buyer's id ([a-z0-9-])")],
    key: Annotated[str, typer.Option("--key", help="the buyer's verifier key (`midgate buyer keygen` prints it)")],
    config: Path | None = ConfigOption,
) -> None:
    """Register a buyer and its Ed25519 key; its signed requests are accepted from the next one on."""
    import re

    from coordinator.config import CoordinatorSettings
    from coordinator.market.store import MarketStore
    from protocol.identity import VerifierKey

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
        typer.echo(f"refused: buyer id {name!r} is not [a-z0-9-] (at most 63 characters)", err=True)
        raise typer.Exit(2)
    settings = CoordinatorSettings.load_for_command(config)
    verifier = VerifierKey.parse(key)
    store = MarketStore(settings.market_path)
    try:
        store.add_buyer(name, verifier, _now_ms())
    finally:
        store.close()
    typer.echo(f"buyer {name} added: key {verifier.key_id.hex()}")


@operator_app.command("revoke")
def revoke_buyer(
    name: Annotated[str, typer.Argument(help="the buyer's id")], config: Path | None = ConfigOption
) -> None:
    """Revoke a buyer's key: its requests are refused `revoked_key` from the next one on; its jobs keep running."""
    from coordinator.config import CoordinatorSettings
    from coordinator.market.store import MarketStore

    store = MarketStore(CoordinatorSettings.load_for_command(config).market_path)
    try:
        buyer = store.revoke_buyer(name, _now_ms())
    finally:
        store.close()
    typer.echo(f"buyer {name} revoked (key {buyer.key.key_id.hex()})")


@operator_app.command("list")
def list_buyers(config: Path | None = ConfigOption) -> None:
    """Registered buyers, one a line: name, key id, added, revoked."""
    from coordinator.config import CoordinatorSettings
    from coordinator.market.store import MarketStore

    store = MarketStore(CoordinatorSettings.load_for_command(config).market_path)
    try:
        buyers = store.buyers()
    finally:
        store.close()
    typer.echo("buyer\tkey_id\tadded_ms\trevoked_ms")
    for b in buyers:
        typer.echo(f"{b.name}\t{b.key.key_id.hex()}\t{b.added_ms}\t{b.revoked_ms or '-'}")


# The buyer's side

KeyOption = typer.Option(..., "--key", envvar="MIDGATE_BUYER_KEY", dir_okay=False, help="the buyer's key file (0600)")
BuyerOption = typer.Option(..., "--buyer", envvar="MIDGATE_BUYER", help="your buyer id, as the MID registered it")
CoordinatorOption = typer.Option(
    ..., "--coordinator", envvar="MIDGATE_COORDINATOR_URL", help="the coordinator's base URL, e.g. https://mid.example"
)
JobId = Annotated[str, typer.Argument(help="the job id `job request` printed")]


def _client(key: Path, buyer: str, coordinator: str) -> BuyerClient:
    from coordinator.market.client import BuyerClient
    from protocol.identity import load_signer_key

    return BuyerClient(coordinator, buyer, load_signer_key(key))


def _show(answer: Any) -> None:
    typer.echo(json.dumps(answer, indent=1))


def _refused(error: Exception) -> None:
    typer.echo(f"refused: {error}", err=True)
    raise typer.Exit(1)


@buyer_job_app.command("request")
def request(
    task: Annotated[str, typer.Option(help="task id@version (`midgate buyer tasks`)")],
    purpose: Annotated[str, typer.Option(help="what the model is for: a purpose code ([a-z0-9-])")],
    rounds: Annotated[int | None, typer.Option(help="federated rounds (default: the task's)")] = None,
    min_members: Annotated[int, typer.Option(help="fewest members that must train it")] = 2,
    max_members: Annotated[int, typer.Option(help="most members it may use")] = 100,
    dp: Annotated[bool, typer.Option("--dp/--no-dp", help="require differential privacy")] = False,
    task_spec: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="propose the task: its spec (JSON, id@version = --task); quoted once the MID's operator approves it",
        ),
    ] = None,
    validation: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="your validation window file, uploaded at once")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="repeat the command with the same key to get the same job, never a second")
    ] = None,
    key: Path = KeyOption,
    buyer: str = BuyerOption,
    coordinator: str = CoordinatorOption,
) -> None:
    """Ask for a job; prints it as JSON (its `job_id` names it in the other commands)."""
    from coordinator.market.client import Refused

    client = _client(key, buyer, coordinator)
    spec: dict[str, Any] = {
        "task": task,
        "purpose": purpose,
        "min_members": min_members,
        "max_members": max_members,
        "dp_required": dp,
    }
    if rounds is not None:
        spec["rounds"] = rounds
    if task_spec is not None:
        try:
            spec["task_spec"] = json.loads(task_spec.read_bytes()[: 64 * 1024])
        except ValueError:
            typer.echo(f"refused: {task_spec} is not a JSON task spec", err=True)
            raise typer.Exit(2) from None
    try:
        job = client.request_job(spec, idempotency_key)
        if validation is not None:
            job = client.upload_validation(job["job_id"], validation.read_bytes())
    except Refused as error:
        _refused(error)
    _show(job)


@buyer_job_app.command("validation")
def validation(
    job_id: JobId,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="a window file for the job's task")],
    key: Path = KeyOption,
    buyer: str = BuyerOption,
    coordinator: str = CoordinatorOption,
) -> None:
    """Upload (or replace, before acceptance) the job's validation data."""
    from coordinator.market.client import Refused

    try:
        _show(_client(key, buyer, coordinator).upload_validation(job_id, file.read_bytes()))
    except Refused as error:
        _refused(error)


def _action(job_id: str, action: str, key: Path, buyer: str, coordinator: str) -> None:
    from coordinator.market.client import Refused

    try:
        _show(_client(key, buyer, coordinator).job(job_id, action))
    except Refused as error:
        _refused(error)


@buyer_job_app.command("quote")
def quote(job_id: JobId, key: Path = KeyOption, buyer: str = BuyerOption, coordinator: str = CoordinatorOption) -> None:
    """Get the job's price: members, member pool, MID fee, total; prints the job with its quote."""
    _action(job_id, "quote", key, buyer, coordinator)


@buyer_job_app.command("accept")
def accept(
    job_id: JobId,
    quote_sha256: Annotated[
        str | None, typer.Option(help="the quote to accept (default: the job's current one)")
    ] = None,
    key: Path = KeyOption,
    buyer: str = BuyerOption,
    coordinator: str = CoordinatorOption,
) -> None:
    """Pay the quoted total into escrow; the MID starts the job."""
    from coordinator.market.client import Refused

    client = _client(key, buyer, coordinator)
    try:
        job = client.job(job_id)
        quote = job.get("quote")
        if quote is None:
            typer.echo("refused: the job has no quote yet (`buyer job quote`)", err=True)
            raise typer.Exit(1)
        _show(client.accept(job_id, quote_sha256 or job["quote_sha256"], int(quote["total_minor"])))
    except Refused as error:
        _refused(error)


@buyer_job_app.command("status")
def status(
    job_id: JobId, key: Path = KeyOption, buyer: str = BuyerOption, coordinator: str = CoordinatorOption
) -> None:
    """The job as JSON: state, quote, escrow, progress (round, members, accuracy), ledger leaves."""
    _action(job_id, "", key, buyer, coordinator)


@buyer_job_app.command("cancel")
def cancel(
    job_id: JobId, key: Path = KeyOption, buyer: str = BuyerOption, coordinator: str = CoordinatorOption
) -> None:
    """Drop a job not accepted yet, or stop a running one (its escrow is refunded)."""
    _action(job_id, "cancel", key, buyer, coordinator)


@buyer_job_app.command("list")
def list_jobs(key: Path = KeyOption, buyer: str = BuyerOption, coordinator: str = CoordinatorOption) -> None:
    """Your jobs, one a line: id, state, task, round, accuracy, reason."""
    from coordinator.market.client import Refused

    try:
        jobs = _client(key, buyer, coordinator).jobs()
    except Refused as error:
        _refused(error)
    typer.echo("job\tstate\ttask\tround\taccuracy\treason")
    for job in jobs:
        p = job["progress"]
        accuracy = "-" if p["accuracy"] is None else f"{p['accuracy']:.4f}"
        typer.echo(
            f"{job['job_id']}\t{job['state']}\t{job['request']['task']}\t{p['round']}/{p['rounds'] or '-'}\t"
            f"{accuracy}\t{job['reason'] or '-'}"
        )


@buyer_job_app.command("follow")
def follow(
    job_id: JobId, key: Path = KeyOption, buyer: str = BuyerOption, coordinator: str = CoordinatorOption
) -> None:
    """One line per change (server-sent events) until the job ends; exits 0 only when it is delivered."""
    from coordinator.market.client import Refused

    state = ""
    try:
        for job in _client(key, buyer, coordinator).events(job_id):
            p, state = job["progress"], job["state"]
            accuracy = "" if p["accuracy"] is None else f", accuracy {p['accuracy']:.4f}"
            members = f", {len(p['members'])} member(s)" if p["members"] else ""
            reason = f" ({job['reason']})" if job["reason"] else ""
            typer.echo(f"{job_id}: {state}{reason}, round {p['round']}/{p['rounds']}{members}{accuracy}")
            sys.stdout.flush()
    except Refused as error:
        _refused(error)
    raise typer.Exit(0 if state == "delivered" else 1)


@buyer_job_app.command("download")
def download(
    job_id: JobId,
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="where to write the model")],
    key: Path = KeyOption,
    buyer: str = BuyerOption,
    coordinator: str = CoordinatorOption,
) -> None:
    """Download the delivered model; checks its SHA-256 over the arrays against the job's `model_sha256`."""
    import io

    from coordinator.market.client import Refused
    from protocol.tasks.arrays import arrays_sha256

    client = _client(key, buyer, coordinator)
    try:
        job = client.job(job_id)
        data = client.model(job_id)
    except Refused as error:
        _refused(error)
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        found = arrays_sha256({name: arrays[name] for name in arrays.files})
    if found != job["model_sha256"]:
        typer.echo(f"refused: the model's hash {found} is not the job's {job['model_sha256']}", err=True)
        raise typer.Exit(1)
    output.write_bytes(data)
    typer.echo(f"{output}: model version {job['model_version']}, sha256 {found}")


@buyer_job_app.command("manifest")
def manifest(
    job_id: JobId,
    output: Annotated[Path, typer.Option("--output", "-o", dir_okay=False, help="where to write the manifest")],
    key: Path = KeyOption,
    buyer: str = BuyerOption,
    coordinator: str = CoordinatorOption,
) -> None:
    """Download the delivered job's provenance manifest (signed by the MID); check it and the model offline with
    `midgate buyer verify-model MODEL MANIFEST --mid-key VKEY`."""
    from coordinator.market.client import Refused

    try:
        data = _client(key, buyer, coordinator).manifest(job_id)
    except Refused as error:
        _refused(error)
    output.write_bytes(data)
    typer.echo(f"{output}: verify with `midgate buyer verify-model MODEL {output} --mid-key VKEY`")


def task_proposals(config: Path | None = ConfigOption) -> None:
    """Task specs buyers proposed with a job request, awaiting approval: job, buyer, then the task's line."""
    from coordinator.config import CoordinatorSettings
    from coordinator.market.proposals import proposals as awaiting
    from coordinator.market.store import MarketStore
    from coordinator.tasks.cli import open_catalogue

    settings = CoordinatorSettings.load_for_command(config)
    store = MarketStore(settings.market_path)
    try:
        with open_catalogue(settings) as catalogue:
            for proposal in awaiting(store, catalogue):
                s = proposal.spec
                typer.echo(f"{proposal.job_id}  {proposal.buyer}  {s.key}  {s.kind}  {s.model.family}  {s.description}")
    finally:
        store.close()


def task_approve(
    job: str = typer.Argument(..., help="the job whose proposed task spec to approve (`task proposals`)"),
    config: Path | None = ConfigOption,
) -> None:
    """Approve the task spec a buyer proposed with job JOB: checked like `task add`, signed with the MID key and
    kept; the job can then be quoted. `task proposals` lists what awaits approval."""
    from coordinator.config import CoordinatorSettings
    from coordinator.market.proposals import approve as approve_proposal
    from coordinator.market.store import MarketStore
    from coordinator.tasks.cli import open_catalogue
    from protocol.errors import ProtocolError

    settings = CoordinatorSettings.load_for_command(config)
    store = MarketStore(settings.market_path)
    try:
        with open_catalogue(settings) as catalogue:
            added = approve_proposal(store, catalogue, job, time.time_ns() // 1_000_000)
    except ProtocolError as error:
        typer.echo(f"task refused: {error}", err=True)
        raise typer.Exit(2) from None
    finally:
        store.close()
    typer.echo(f"approved: {added.spec.key}  {added.spec.kind}  {added.spec.model.family}  {added.spec.description}")
