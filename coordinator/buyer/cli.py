"""`midgate buyer` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from protocol.provenance import Manifest

app = typer.Typer(
    no_args_is_help=True, help="AI buyer commands: quotes, jobs, models and their provenance, revenue reports."
)

KeyFile = Annotated[Path, typer.Option("--key", dir_okay=False, help="the buyer's signing key file (0600)")]


@app.command("keygen")
def keygen(
    key: KeyFile,
    name: Annotated[str, typer.Option(help="key name, e.g. the buyer id")] = "midgate-buyer",
    force: Annotated[bool, typer.Option(help="overwrite an existing key file")] = False,
) -> None:
    """Create the buyer's Ed25519 key (0600) and print its verifier key for the MID's `[buyers.keys]`."""
    from protocol.identity import SignerKey, save_signer_key

    if key.exists() and not force:
        typer.echo(f"{key} exists; pass --force to replace it", err=True)
        raise typer.Exit(1)
    signer = SignerKey.generate(name)
    save_signer_key(key, signer)
    typer.echo(signer.verifier.text())


@app.command("report-revenue")
def report_revenue(
    model_version: Annotated[
        str,
        typer.Argument(
            help="the model version, as named in its settlement, or its manifest as `manifest:<sha256>` (the"
            " reference `verify-model` prints)"
        ),
    ],
    amount_minor: Annotated[int, typer.Argument(min=0, help="revenue in integer minor units")],
    key: KeyFile,
    coordinator: Annotated[str, typer.Option(help="the coordinator's base URL, e.g. https://mid.example")],
    mid: Annotated[str, typer.Option(help="the MID id")],
    buyer: Annotated[str, typer.Option(help="your buyer id, as the MID configured it")],
    model_id: Annotated[str, typer.Option(help="the model id")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code")],
    period_start_ms: Annotated[int, typer.Option(help="period start, ms since epoch UTC")],
    period_end_ms: Annotated[int, typer.Option(help="period end, ms since epoch UTC")],
    seq: Annotated[int, typer.Option(min=0, help="report number, unique per key (a repeat is refused as replayed)")],
    timeout_s: Annotated[float, typer.Option(help="HTTP timeout")] = 30.0,
) -> None:
    """Sign a RevenueReport and post it; prints the royalty receipt (record id, leaf index, tlog-proof) as JSON."""
    import urllib.error
    import urllib.request

    from pydantic import ValidationError

    from coordinator.buyer.http import REVENUE_PATH
    from protocol.errors import ProtocolError
    from protocol.identity import load_signer_key
    from protocol.messages import RevenueReport

    try:
        signer = load_signer_key(key)
        report = RevenueReport(
            mid=mid,
            buyer=buyer,
            model_id=model_id,
            model_version=model_version,
            period_start_ms=period_start_ms,
            period_end_ms=period_end_ms,
            amount_minor=amount_minor,
            currency=currency,
            seq=seq,
            issued_ms=time.time_ns() // 1_000_000,
        )
    except (ProtocolError, ValidationError) as error:
        typer.echo(f"invalid: {error}", err=True)
        raise typer.Exit(2) from None
    request = urllib.request.Request(
        coordinator.rstrip("/") + REVENUE_PATH,
        data=report.seal(signer),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        detail = error.read()[:2048].decode(errors="replace")
        try:
            refusal = json.loads(detail)
            typer.echo(f"refused: {refusal['reason']}: {refusal['message']}", err=True)
        except (ValueError, KeyError, TypeError):
            typer.echo(f"refused: HTTP {error.code}: {detail}", err=True)
        raise typer.Exit(1) from None
    except OSError as error:
        typer.echo(f"unreachable: {coordinator}: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(body.decode())


MAX_TASK_LIST_BYTES = 8 * 1024 * 1024


@app.command("tasks")
def tasks(
    coordinator: Annotated[str, typer.Option(help="the coordinator's base URL, e.g. https://mid.example")],
    mid_key: Annotated[
        str | None, typer.Option(help="the MID's verifier key: check every spec's signature against it")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the specs as JSON, one a line")] = False,
    timeout_s: Annotated[float, typer.Option(help="HTTP timeout")] = 30.0,
) -> None:
    """The MID's tasks (public, read-only): id@version, kind, model family, inputs with units and sources."""
    import urllib.request

    from coordinator.tasks.http import TASKS_PATH
    from protocol.errors import ProtocolError
    from protocol.identity import VerifierKey
    from protocol.tasks.signed import open_task_spec
    from protocol.tasks.spec import TaskSpec

    try:
        with urllib.request.urlopen(coordinator.rstrip("/") + TASKS_PATH, timeout=timeout_s) as response:
            listed = json.loads(response.read(MAX_TASK_LIST_BYTES))["tasks"]
        key = VerifierKey.parse(mid_key) if mid_key is not None else None
        specs: list[TaskSpec] = []
        for entry in listed:
            envelope = str(entry["envelope"]).encode()
            if key is not None:
                specs.append(open_task_spec(envelope, key))
            else:
                from protocol.envelope import peek_envelope
                from protocol.tasks.spec import parse_task_spec

                specs.append(parse_task_spec(peek_envelope(envelope)[1]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        typer.echo(f"unreachable or not a task list: {coordinator}: {error}", err=True)
        raise typer.Exit(1) from None
    except ProtocolError as error:
        typer.echo(f"refused: {error}", err=True)
        raise typer.Exit(1) from None
    for spec in specs:
        if as_json:
            typer.echo(spec.canonical_json().decode())
            continue
        inputs = ", ".join(f"{i.name}[{i.unit}] from {'|'.join(i.sources)}" for i in spec.inputs)
        typer.echo(f"{spec.key}  {spec.kind}  {spec.model.family}  {inputs}  {spec.description}")


@app.command("verify-model")
def verify_model(
    model: Annotated[Path, typer.Argument(dir_okay=False, help="the delivered model file")],
    manifest: Annotated[Path, typer.Argument(dir_okay=False, help="its provenance manifest (signed by the MID)")],
    mid_key: Annotated[
        str, typer.Option(help="the MID's verifier key (C2SP text), or a file holding it; obtained out of band")
    ],
    ledger: Annotated[
        Path | None,
        typer.Option(
            dir_okay=False, help="a copy of the MID's ledger file: also recompute the contribution root from it"
        ),
    ] = None,
) -> None:
    """Verify offline, with nothing but the MID's key, that MODEL is the model MANIFEST describes: the MID's
    signature, the model's hash, the checkpoint's signature, and the inclusion of the job's JOB and SETTLEMENT leaves
    in that checkpoint (protocol/provenance.py). Exits 0 and prints the manifest's summary and reference, or exits 1
    with the failed step and its reason code (2: the key or a file cannot be read)."""
    from protocol.errors import ProtocolError
    from protocol.identity import VerifierKey
    from protocol.provenance import MAX_MANIFEST_BYTES, verify_manifest

    try:
        key_text = Path(mid_key).read_text() if Path(mid_key).is_file() else mid_key
        key = VerifierKey.parse(key_text)
        with manifest.open("rb") as fh:
            envelope = fh.read(MAX_MANIFEST_BYTES + 1)
    except (ProtocolError, OSError, ValueError) as error:
        typer.echo(f"cannot verify: {error}", err=True)
        raise typer.Exit(2) from None
    try:
        verified = verify_manifest(envelope, model, key)
        if ledger is not None:
            _check_contributions(verified.manifest, ledger, verified.checkpoint.checkpoint.size)
    except ProtocolError as error:
        step = error.details.get("step", "manifest")
        typer.echo(f"refused: {step}: {error}", err=True)
        raise typer.Exit(1) from None
    m = verified.manifest
    checkpoint = verified.checkpoint.checkpoint
    typer.echo(f"verified: {model} is model {m.model_version} of job {m.job_id} (MID {m.mid})")
    typer.echo(f"model sha256 {m.model.sha256}; task {m.task.id}@{m.task.version} spec sha256 {m.task.spec_sha256}")
    typer.echo(f"purpose {m.purpose.code} ({m.purpose.dpv or 'no DPV concept'}), policy v{m.purpose.policy_version}")
    typer.echo(f"licence: {m.purpose.licence}")
    typer.echo(f"rounds {m.rounds_completed}/{m.rounds}; members {len(m.members)}: {', '.join(m.members)}")
    typer.echo(
        f"contributions: {m.contributions.count} leaves of run {m.contributions.run_id}, root {m.contributions.root}"
    )
    typer.echo(
        f"settlement leaf {m.settlement_leaf.index} and job leaf {m.job_leaf.index} included in checkpoint"
        f" {checkpoint.origin} size {checkpoint.size}"
    )
    if ledger is not None:
        typer.echo(f"contribution root recomputed from {ledger}: it is the log's")
    typer.echo(f"reference: {verified.reference}")


def _check_contributions(manifest: Manifest, ledger: Path, size: int) -> None:
    from coordinator.ledger.store import LedgerReader
    from protocol.errors import ProtocolError
    from protocol.provenance import check_contributions

    try:
        with LedgerReader.open_existing(ledger) as reader:
            leaves = reader.leaves(0, manifest.contributions.before_index)
            check_contributions(manifest, reader.root_at(size), leaves)
    except ProtocolError as error:  # a copy shorter than the checkpoint, or not a ledger
        error.details.setdefault("step", "contributions")
        raise
