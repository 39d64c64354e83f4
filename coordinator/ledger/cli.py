"""`midgate ledger` commands.

Offline checks take their inputs in the C2SP text formats (tlog-checkpoint, tlog-proof, tlog-witness add-checkpoint
body), so any tool can produce them. `recompute-job` redoes a JOB leaf's attribution from its ROUND leaves
(protocol/job_attribution.py). Exit codes: 0 and `ok` when valid, 1 and the reason when not, 2 on usage errors.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Annotated

import typer

from coordinator.ledger.audit import audit_ledger
from coordinator.ledger.store import LedgerReader
from protocol.checkpoint import AddCheckpointBody, parse_checkpoint_text, verify_receipt, verify_receipt_hash
from protocol.errors import ProtocolError
from protocol.identity import VerifierKey
from protocol.leaves import Leaf, LeafKind, decode_leaf
from protocol.merkle import HASH_SIZE, b64, leaf_hash
from protocol.note import parse_note
from protocol.witness import CosignaturePolicy, CosignatureVerifier, LogView

app = typer.Typer(
    no_args_is_help=True,
    help="Transparency-ledger commands: verify a ledger, show entries, print and check proofs offline.",
)

MAX_INPUT_FILE = 4 << 20

VkeyOption = Annotated[str, typer.Option("--vkey", help="log verifier key: the vkey text or a file holding it")]
ExistingFile = Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)]
WitnessOption = Annotated[
    list[str] | None,
    typer.Option("--witness", help="a member witness key (cosignature vkey text or file); repeatable"),
]
QuorumOption = Annotated[
    int, typer.Option("--quorum", min=0, help="require this many valid cosignatures from the --witness keys")
]


def _vkey(value: str) -> VerifierKey:
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        return VerifierKey.parse(text)
    except ProtocolError as exc:
        raise typer.BadParameter(str(exc), param_hint="--vkey") from exc


def _policy(witnesses: list[str] | None, quorum: int) -> CosignaturePolicy | None:
    keys = []
    for value in witnesses or []:
        path = Path(value)
        try:
            keys.append(CosignatureVerifier.parse(path.read_text() if path.is_file() else value))
        except ProtocolError as exc:
            raise typer.BadParameter(str(exc), param_hint="--witness") from exc
    if quorum == 0:
        if keys:
            raise typer.BadParameter("--witness needs --quorum K", param_hint="--quorum")
        return None
    try:
        return CosignaturePolicy(tuple(keys), quorum)
    except ProtocolError as exc:
        raise typer.BadParameter(str(exc), param_hint="--quorum") from exc


def _read(path: Path) -> bytes:
    if path.stat().st_size > MAX_INPUT_FILE:
        raise typer.BadParameter(f"{path} is larger than {MAX_INPUT_FILE} bytes")
    return path.read_bytes()


def _ok(details: str) -> None:
    """`ok` alone on stdout (scripts compare it); what was checked goes to stderr."""
    typer.echo("ok")
    typer.echo(details, err=True)


def _fail(exc: ProtocolError) -> typer.Exit:
    typer.echo(f"invalid: {exc}", err=True)
    return typer.Exit(1)


@app.command()
def verify(
    db: ExistingFile,
    vkey: VkeyOption,
    trusted: Annotated[
        list[Path] | None,
        typer.Option(
            "--trusted", exists=True, dir_okay=False, help="a checkpoint held outside the ledger (repeatable)"
        ),
    ] = None,
) -> None:
    """Re-derive every hash and signature in ledger DB; name the first bad leaf, node or checkpoint."""
    key = _vkey(vkey)
    notes = [_read(p) for p in trusted or []]
    try:
        report = audit_ledger(db, key, notes)
    except ProtocolError as exc:
        raise _fail(exc) from None
    _ok(
        f"{report.size} leaves, {report.batches} batches, {report.checkpoints} checkpoints verified"
        + (f", {report.trusted_checked} trusted checkpoints matched" if report.trusted_checked else "")
    )


@app.command()
def show(
    db: ExistingFile,
    start: Annotated[int, typer.Option(min=0, help="first leaf index")] = 0,
    count: Annotated[int, typer.Option(min=0, help="leaves to list")] = 20,
) -> None:
    """Print the latest checkpoint and a range of entries (index, kind, size, leaf hash, and for a job's or an
    escrow's leaf what it is about)."""
    try:
        with LedgerReader.open_existing(db) as ledger:
            typer.echo(f"origin {ledger.origin}\nsize {ledger.size}\nroot {b64(ledger.root())}")
            for index, data in ledger.leaves(start, start + count):
                try:
                    leaf = decode_leaf(data)
                except ProtocolError:
                    typer.echo(f"{index}\tuntyped\t{len(data)}\t{b64(leaf_hash(data))}")
                    continue
                about = _about(leaf)
                typer.echo(f"{index}\t{leaf.kind.name.lower()}\t{len(data)}\t{b64(leaf_hash(data))}" + about)
    except ProtocolError as exc:
        raise _fail(exc) from None


def _about(leaf: Leaf) -> str:
    """A tab and what a JOB, ROUND or escrow leaf is about (a settlement's is `midgate coordinator job show`'s); ""
    for other kinds, and the reason code for a body that does not decode (the line still shows the leaf)."""
    from protocol.escrow import EVENT_KIND, decode_escrow_record
    from protocol.job_log import decode_job_record, decode_round_record

    try:
        if leaf.kind is LeafKind.JOB:
            job = decode_job_record(leaf.signed)
            rounds = f"{job.rounds_completed}/{job.rounds} rounds"
            return f"\tjob {job.job_id} {job.status}, {rounds}, {len(job.devices)} devices"
        if leaf.kind is LeafKind.ROUND:
            rnd = decode_round_record(leaf.signed)
            part = f" (part {rnd.part} of {rnd.parts})" if rnd.parts > 1 else ""
            return f"\tjob {rnd.job_id} round {rnd.round}{part}, {len(rnd.updates)} updates, {len(rnd.drops)} drops"
        if leaf.kind in EVENT_KIND.values():
            escrow = decode_escrow_record(leaf.signed)
            detail = {"deposit": "", "release": f" into leaf {escrow.settlement_index}", "refund": f": {escrow.reason}"}
            return (
                f"\tjob {escrow.job_id} {escrow.event} {escrow.amount_minor} {escrow.currency} by {escrow.buyer}"
                + detail[escrow.event]
            )
    except ProtocolError as exc:
        return f"\tundecodable: {exc.reason}"
    return ""


@app.command()
def proof(
    db: ExistingFile,
    index: Annotated[int | None, typer.Argument(min=0, help="leaf index: print its c2sp.org/tlog-proof")] = None,
    old: Annotated[
        int | None, typer.Option(min=0, help="old size: print a tlog-witness add-checkpoint body from it")
    ] = None,
    size: Annotated[int | None, typer.Option(min=1, help="checkpoint size to prove against (default: latest)")] = None,
) -> None:
    """Print a receipt for leaf INDEX, or (--old N) a consistency body from size N to the checkpoint."""
    if (index is None) == (old is None):
        raise typer.BadParameter("give exactly one of INDEX or --old")
    try:
        with LedgerReader.open_existing(db) as ledger:
            if index is not None:
                typer.echo(ledger.receipt(index, size), nl=False)
                return
            assert old is not None
            note = ledger.checkpoint(size)
            new_size = parse_checkpoint_text(parse_note(note).text).size
            body = AddCheckpointBody(old, tuple(ledger.consistency_proof(old, new_size)), note)
            typer.echo(body.encode().decode(), nl=False)
    except ProtocolError as exc:
        raise _fail(exc) from None


@app.command("verify-proof")
def verify_proof(
    proof_file: Annotated[Path, typer.Argument(metavar="PROOF", exists=True, dir_okay=False)],
    vkey: VkeyOption,
    leaf: Annotated[Path | None, typer.Option("--leaf", exists=True, dir_okay=False, help="exact leaf bytes")] = None,
    leaf_hash_b64: Annotated[str | None, typer.Option("--leaf-hash", help="base64 RFC 9162 leaf hash")] = None,
    witness: WitnessOption = None,
    quorum: QuorumOption = 0,
) -> None:
    """Check a c2sp.org/tlog-proof file for a leaf offline (and, with --quorum, its witness cosignatures)."""
    if (leaf is None) == (leaf_hash_b64 is None):
        raise typer.BadParameter("give exactly one of --leaf or --leaf-hash")
    key = _vkey(vkey)
    policy = _policy(witness, quorum)
    receipt = _read(proof_file)
    try:
        if leaf is not None:
            verified = verify_receipt(receipt, _read(leaf), key)
        else:
            assert leaf_hash_b64 is not None
            verified = verify_receipt_hash(receipt, _leaf_hash_arg(leaf_hash_b64), key)
        if policy is not None:
            policy.check(verified.checkpoint.note, key)
    except ProtocolError as exc:
        raise _fail(exc) from None
    _ok(f"leaf {verified.index} is in the tree of size {verified.checkpoint.checkpoint.size}")


def _leaf_hash_arg(value: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise typer.BadParameter("not valid base64", param_hint="--leaf-hash") from exc
    if len(raw) != HASH_SIZE:
        raise typer.BadParameter(f"must be {HASH_SIZE} bytes, got {len(raw)}", param_hint="--leaf-hash")
    return raw


@app.command("verify-consistency")
def verify_consistency_cmd(
    body: Annotated[Path, typer.Argument(metavar="BODY", exists=True, dir_okay=False)],
    vkey: VkeyOption,
    old: Annotated[Path, typer.Option("--old", exists=True, dir_okay=False, help="the checkpoint you trust")],
    witness: WitnessOption = None,
    quorum: QuorumOption = 0,
) -> None:
    """Check a tlog-witness add-checkpoint BODY against the OLD checkpoint you trust (and its cosignatures)."""
    key = _vkey(vkey)
    policy = _policy(witness, quorum)
    try:
        view = LogView(key, _read(old))
        old_size = view.checkpoint.size
        accepted = view.add_checkpoint(_read(body))
        if policy is not None:
            policy.check(accepted.note, key)
    except ProtocolError as exc:
        raise _fail(exc) from None
    _ok(f"size {accepted.checkpoint.size} extends the trusted size {old_size}")


@app.command("recompute-job")
def recompute_job(
    job_id: Annotated[str, typer.Argument(help="the job id of a JOB leaf")],
    db: Annotated[Path, typer.Option("--db", exists=True, dir_okay=False, readable=True, help="ledger file")],
) -> None:
    """Recompute a JOB leaf's attribution and job groups from the job's ROUND leaves alone (integer arithmetic, the
    settlement's own rules) and name the first difference."""
    from protocol.job_attribution import find_job_leaves, verify_job_attribution

    try:
        with LedgerReader.open_existing(db) as ledger:
            found = find_job_leaves(ledger.leaves(0, ledger.size), job_id)
        verify_job_attribution(found.job, found.rounds)
    except ProtocolError as exc:
        raise _fail(exc) from None
    _ok(
        f"leaf {found.index}: job {job_id}'s attribution ({len(found.job.attribution)} members,"
        f" {len(found.job.job_pairs())} job groups) reproduces from its {len(found.rounds)} rounds' ROUND leaves"
    )
