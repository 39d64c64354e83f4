"""A model's provenance manifest: where a delivered model came from, signed by the MID, verifiable offline.

The manifest (`Manifest`) names the model file by its SHA-256, the task spec it was trained for, the purpose and the
licence terms it was sold under, its rounds and members, the Merkle root of the job's contribution leaves, and cites
two leaves of the MID's log with their inclusion proofs in one signed checkpoint: the job's JOB leaf (protocol.job_log,
which names the model's arrays hash, task, purpose and buyer) and its SETTLEMENT leaf (the payment's split among the
members). It travels as a DSSE envelope (protocol.envelope) signed by the MID key under `PAYLOAD_TYPE`; the MID key
is also the log key, so one verifier key checks the manifest and the checkpoint.

`verify_manifest(envelope, model_path, mid_key)` needs nothing but those three: it checks, in this order, and stops at
the first failure with its reason code and the `step` that failed (`details["step"]`):

1. `manifest signature`: the envelope verifies under the MID key and holds a strict `Manifest`;
2. `model hash`: the file's SHA-256 and size are the manifest's (`model_mismatch`), and its arrays hash
   (protocol.tasks.arrays) is the one the manifest names (`model_mismatch`);
3. `checkpoint`: the checkpoint note is signed by the MID key and its origin is the MID's log;
4. `settlement inclusion`, `job inclusion`: each cited leaf's RFC 9162 inclusion proof reaches the checkpoint's root;
5. `leaves`: the cited leaves say what the manifest says (`manifest_mismatch`): a completed JOB leaf of this job with
   this model version, arrays hash, task, purpose, buyer, rounds and run, and this job's SETTLEMENT leaf naming the
   same model version and members.

The contribution root cannot be checked from the manifest alone (the leaves are in the MID's log, not in the
manifest): anyone who holds a copy of the log checks it with `check_contributions` (`verify-model --ledger`;
docs/protocol.md, "Provenance manifest").

A revenue report may name the model by its manifest: `manifest_reference(manifest)` is `manifest:<SHA-256 of the
manifest's canonical JSON>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol.checkpoint import VerifiedCheckpoint, open_checkpoint
from protocol.envelope import decode, open_envelope, parse_unverified_payload, peek_envelope, seal
from protocol.errors import (
    MalformedError,
    ManifestMismatchError,
    ModelMismatchError,
    ProtocolError,
    TooLargeError,
    WrongTypeError,
)
from protocol.identity import SignerKey, VerifierKey
from protocol.job_log import JobLogRecord, ModelVersion, decode_job_record
from protocol.leaves import MAX_SIGNED_SIZE, Leaf, LeafKind, decode_leaf
from protocol.merkle import HASH_SIZE, MAX_PROOF_HASHES, leaf_hash, merkle_root, verify_inclusion
from protocol.messages import U64, CanonicalModel, ContributionReport, Ident, Sha256Hex, ShortText, TimeMs

PAYLOAD_TYPE = "application/vnd.midgate.provenance-manifest.v1+json"
SCHEMA = "midgate.manifest.v1"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""A signed manifest: two leaves of at most 1 MiB each (a settlement of ~5,000 members), base64, and one checkpoint."""
MAX_CHECKPOINT_BYTES = 64 * 1024
MAX_LICENCE_CHARS = 4096
REFERENCE_PREFIX = "manifest:"
REFERENCE_PATTERN = r"^manifest:[0-9a-f]{64}$"
_READ_CHUNK = 1 << 20

Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=2 * MAX_SIGNED_SIZE)]
HashB64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]


class ModelFile(CanonicalModel):
    """The delivered model file: its name (informational), SHA-256 and size of its exact bytes, and the hash of the
    arrays it holds (protocol.tasks.arrays.arrays_sha256), which the JOB leaf names as `final_model_sha256`."""

    name: ShortText
    sha256: Sha256Hex
    size_bytes: int = Field(ge=0, le=1 << 40)
    arrays_sha256: Sha256Hex


class TaskRef(CanonicalModel):
    """The task the model was trained for, and the SHA-256 of its spec's canonical JSON (protocol.tasks.spec)."""

    id: Ident
    version: int = Field(ge=1, le=1_000_000)
    spec_sha256: Sha256Hex


class PurposeTerms(CanonicalModel):
    """What the buyer may use the model for: the job's purpose code, its DPV concept, and the licence terms of the
    MID policy version the job ran under."""

    code: Ident
    dpv: ShortText = ""
    licence: Annotated[str, StringConstraints(max_length=MAX_LICENCE_CHARS)]
    policy_version: int = Field(ge=0)
    """The POLICY leaf version whose vocabulary gave these terms (0: the job predates every POLICY leaf)."""


class ContributionSet(CanonicalModel):
    """The job's contribution leaves: the CONTRIBUTION leaves of the log whose report names the job's Flower run,
    at indices below `before_index` (the settlement leaf's), in log order. `root` is the RFC 9162 tree hash over
    those leaves' exact bytes (so its leaf hashes are the log's own), hex; the empty tree's hash when `count` is 0."""

    run_id: U64
    count: int = Field(ge=0)
    before_index: int = Field(ge=0)
    root: Sha256Hex


class LeafInclusion(CanonicalModel):
    """A leaf of the MID's log: its index, its exact bytes (base64), and its RFC 9162 inclusion path (base64 hashes,
    leaf sibling first) in the manifest's checkpoint."""

    index: int = Field(ge=0)
    leaf: Base64
    proof: tuple[HashB64, ...] = Field(max_length=MAX_PROOF_HASHES)


class Manifest(CanonicalModel):
    """A model's provenance (module docstring); signed by the MID key as a DSSE envelope of `PAYLOAD_TYPE`."""

    schema_id: Literal["midgate.manifest.v1"] = "midgate.manifest.v1"
    mid: Ident
    log_origin: ShortText
    job_id: Ident
    model_version: ModelVersion
    model: ModelFile
    task: TaskRef
    purpose: PurposeTerms
    buyer: Ident
    rounds: int = Field(ge=1, le=10_000)
    rounds_completed: int = Field(ge=0, le=10_000)
    members: tuple[Ident, ...] = Field(max_length=100_000)
    """The members the settlement pays or names (pseudonymous member ids, sorted)."""
    contributions: ContributionSet
    job_leaf: LeafInclusion
    settlement_leaf: LeafInclusion
    checkpoint: Annotated[str, StringConstraints(max_length=MAX_CHECKPOINT_BYTES)]
    """The signed checkpoint note (C2SP tlog-checkpoint) both inclusion proofs are against, verbatim."""
    issued_ms: TimeMs


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest whose every offline check passed; `reference` is what a revenue report may name the model by."""

    manifest: Manifest
    checkpoint: VerifiedCheckpoint
    job: JobLogRecord
    reference: str


def seal_manifest(manifest: Manifest, mid_key: SignerKey) -> bytes:
    """The manifest's canonical JSON in a DSSE envelope signed by the MID key."""
    return seal(PAYLOAD_TYPE, manifest.canonical_json(), mid_key, max_size=MAX_MANIFEST_BYTES)


def open_manifest(envelope: bytes, mid_key: VerifierKey) -> Manifest:
    """Verify the MID's signature over a manifest and parse it strictly (no other check)."""
    verified = open_envelope(envelope, {mid_key.key_id.hex(): mid_key}, PAYLOAD_TYPE, max_size=MAX_MANIFEST_BYTES)
    return decode(verified, Manifest)


def read_manifest_unverified(envelope: bytes) -> Manifest:
    """The manifest in an envelope WITHOUT checking its signature: only to show what a refused manifest claims."""
    payload_type, payload, _ = peek_envelope(envelope, max_size=MAX_MANIFEST_BYTES)
    return parse_unverified_payload(payload_type, payload, Manifest)


def manifest_sha256(manifest: Manifest) -> str:
    """SHA-256 (hex) of the manifest's canonical JSON: the signed content, whatever the envelope's spelling."""
    return hashlib.sha256(manifest.canonical_json()).hexdigest()


def manifest_reference(manifest: Manifest) -> str:
    """How a revenue report names the model of this manifest: `manifest:<manifest_sha256>`."""
    return REFERENCE_PREFIX + manifest_sha256(manifest)


def is_manifest_reference(text: str) -> bool:
    return re.fullmatch(REFERENCE_PATTERN, text) is not None


def file_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 (hex) and size of a file's exact bytes, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def model_arrays_sha256(path: Path) -> str:
    """protocol.tasks.arrays.arrays_sha256 of the arrays in an .npz model file (no pickled objects are loaded)."""
    import numpy as np

    from protocol.tasks.arrays import arrays_sha256

    try:
        with np.load(path, allow_pickle=False) as npz:
            return arrays_sha256({name: npz[name] for name in npz.files})
    except (ValueError, OSError, EOFError, binascii.Error) as exc:
        raise ModelMismatchError("model file is not an .npz of arrays", path=str(path), error=str(exc)[:200]) from None


def contribution_run_id(leaf: Leaf) -> int | None:
    """The Flower run id a CONTRIBUTION leaf's report names; None for any other leaf. The leaf's envelope is not
    verified here: ingest verified it before appending it, and a reader re-verifies it with the device's key."""
    if leaf.kind is not LeafKind.CONTRIBUTION:
        return None
    try:
        payload_type, payload, _ = peek_envelope(leaf.signed)
        return parse_unverified_payload(payload_type, payload, ContributionReport).run_id
    except (MalformedError, WrongTypeError, TooLargeError):
        return None  # a report of a retired version (v1) names no run a manifest can cite


def job_contribution_leaves(leaves: Iterable[tuple[int, bytes]], run_id: int, before_index: int) -> Iterator[bytes]:
    """The exact bytes of the job's contribution leaves (ContributionSet) among `leaves` ((index, bytes) in log
    order): CONTRIBUTION leaves naming `run_id`, at indices below `before_index`."""
    for index, data in leaves:
        if index >= before_index:
            return
        if contribution_run_id(decode_leaf(data)) == run_id:
            yield data


def contribution_root(leaves: Iterable[bytes]) -> tuple[str, int]:
    """RFC 9162 tree hash (hex) over the contribution leaves' exact bytes, and their count."""
    items = list(leaves)
    return merkle_root(items).hex(), len(items)


def check_contributions(manifest: Manifest, log_root: bytes, leaves: Iterable[tuple[int, bytes]]) -> None:
    """Check the manifest's contribution root against a copy of the MID's log: `log_root` is that copy's root at the
    manifest's checkpoint size (it must be the checkpoint's root, so the copy is the log the MID signed) and `leaves`
    its (index, bytes) from 0 in order. Raises ManifestMismatchError with `step` "contributions"."""
    with _step("contributions"):
        checkpoint_text = manifest.checkpoint[: manifest.checkpoint.index("\n\n") + 1]
        root_line = checkpoint_text.split("\n")[2]
        if base64.b64encode(log_root).decode() != root_line:
            raise ManifestMismatchError(
                "the log copy is not the log the manifest's checkpoint signs", expected=root_line
            )
        c = manifest.contributions
        root, count = contribution_root(job_contribution_leaves(leaves, c.run_id, c.before_index))
        if (root, count) != (c.root, c.count):
            raise ManifestMismatchError(
                "the contribution root is not the log's", expected=c.root, found=root, count=count, claimed=c.count
            )


def leaf_inclusion(index: int, leaf: bytes, proof: Iterable[bytes]) -> LeafInclusion:
    return LeafInclusion(
        index=index,
        leaf=base64.b64encode(leaf).decode(),
        proof=tuple(base64.b64encode(h).decode() for h in proof),
    )


def verify_manifest(envelope: bytes, model_path: Path, mid_key: VerifierKey) -> VerifiedManifest:
    """Every offline check of the module docstring, in order; raises the first failure's ProtocolError with
    `details["step"]` naming the check."""
    with _step("manifest signature"):
        manifest = open_manifest(envelope, mid_key)
    with _step("model hash"):
        _check_model(manifest.model, model_path)
    with _step("checkpoint"):
        checkpoint = open_checkpoint(manifest.checkpoint.encode(), mid_key)
        if manifest.log_origin != f"midgate/{manifest.mid}":
            raise ManifestMismatchError(
                "the log origin is not the MID's", expected=f"midgate/{manifest.mid}", found=manifest.log_origin
            )
        if checkpoint.checkpoint.origin != manifest.log_origin:
            raise ManifestMismatchError(
                "checkpoint is of another log", expected=manifest.log_origin, found=checkpoint.checkpoint.origin
            )
    cp = checkpoint.checkpoint
    leaves: dict[str, bytes] = {}
    for step, cited in (("settlement inclusion", manifest.settlement_leaf), ("job inclusion", manifest.job_leaf)):
        with _step(step):
            leaf = _b64(cited.leaf, "leaf")
            proof = [_b64(h, "proof hash") for h in cited.proof]
            verify_inclusion(cited.index, cp.size, leaf_hash(leaf), proof, cp.root)
            leaves[step] = leaf
    with _step("leaves"):
        job = _check_job_leaf(manifest, leaves["job inclusion"])
        _check_settlement_leaf(manifest, leaves["settlement inclusion"])
    return VerifiedManifest(manifest, checkpoint, job, manifest_reference(manifest))


@contextmanager
def _step(name: str) -> Iterator[None]:
    """Names the check a ProtocolError came from (`details["step"]`), as verify_receipts names the receipt."""
    try:
        yield
    except ProtocolError as exc:
        exc.details.setdefault("step", name)
        raise


def _check_model(model: ModelFile, path: Path) -> None:
    try:
        sha256, size = file_sha256(path)
    except OSError as exc:
        raise ModelMismatchError("model file cannot be read", path=str(path), error=exc.strerror) from None
    if (sha256, size) != (model.sha256, model.size_bytes):
        raise ModelMismatchError(
            "model file is not the one the manifest names",
            expected_sha256=model.sha256,
            found_sha256=sha256,
            expected_size=model.size_bytes,
            found_size=size,
        )
    arrays = model_arrays_sha256(path)
    if arrays != model.arrays_sha256:
        raise ModelMismatchError(
            "model arrays are not the ones the manifest names", expected=model.arrays_sha256, found=arrays
        )


def _check_job_leaf(manifest: Manifest, data: bytes) -> JobLogRecord:
    leaf = decode_leaf(data)
    if leaf.kind is not LeafKind.JOB:
        raise ManifestMismatchError("the cited job leaf is not a JOB leaf", found=leaf.kind.name)
    job = decode_job_record(leaf.signed)
    claimed = {
        "job_id": manifest.job_id,
        "status": "completed",
        "model_version": manifest.model_version,
        "final_model_sha256": manifest.model.arrays_sha256,
        "task_id": manifest.task.id,
        "task_version": manifest.task.version,
        "purpose": manifest.purpose.code,
        "buyer": manifest.buyer,
        "rounds": manifest.rounds,
        "rounds_completed": manifest.rounds_completed,
        "run_id": manifest.contributions.run_id,
    }
    _same("JOB leaf", claimed, {name: getattr(job, name) for name in claimed})
    if manifest.job_leaf.index >= manifest.settlement_leaf.index:
        raise ManifestMismatchError(
            "the JOB leaf must precede its settlement",
            job_index=manifest.job_leaf.index,
            settlement_index=manifest.settlement_leaf.index,
        )
    return job


class _SettledMember(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    member: str


class _SettledAttribution(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    job_id: str
    model_version: str
    members: list[_SettledMember]


class _SettledInputs(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    kind: str
    record_id: str
    attribution: _SettledAttribution


class _SettlementView(BaseModel):
    """The fields of a settlement record (midgate.split.v1, coordinator/royalties/settlement.py) a manifest cites.
    The rest of the record is not read here: the leaf's inclusion in the signed checkpoint already proves all of it
    is what the MID logged, and a member audits the split itself from the log."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    schema_id: Literal["midgate.split.v1"]
    inputs: _SettledInputs


def _check_settlement_leaf(manifest: Manifest, data: bytes) -> None:
    leaf = decode_leaf(data)
    if leaf.kind is not LeafKind.SETTLEMENT:
        raise ManifestMismatchError("the cited settlement leaf is not a SETTLEMENT leaf", found=leaf.kind.name)
    try:
        record = _SettlementView.model_validate_json(leaf.signed)
    except ValidationError as exc:
        raise MalformedError("settlement leaf is not a split record", first=exc.errors()[0]["msg"]) from None
    inputs = record.inputs
    claimed = {
        "kind": "settlement",
        "record_id": f"settlement-{manifest.job_id}",
        "job_id": manifest.job_id,
        "model_version": manifest.model_version,
        "members": manifest.members,
    }
    found = {
        "kind": inputs.kind,
        "record_id": inputs.record_id,
        "job_id": inputs.attribution.job_id,
        "model_version": inputs.attribution.model_version,
        "members": tuple(m.member for m in inputs.attribution.members),
    }
    _same("SETTLEMENT leaf", claimed, found)
    if manifest.contributions.before_index != manifest.settlement_leaf.index:
        raise ManifestMismatchError(
            "contributions must be counted up to the settlement leaf",
            expected=manifest.settlement_leaf.index,
            found=manifest.contributions.before_index,
        )


def _same(what: str, claimed: Mapping[str, object], found: Mapping[str, object]) -> None:
    for name, value in claimed.items():
        if found[name] != value:
            raise ManifestMismatchError(
                f"the manifest's {name} is not the {what}'s",
                field=name,
                manifest=str(value)[:200],
                leaf=str(found[name])[:200],
            )


def _b64(text: str, what: str) -> bytes:
    try:
        value = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise MalformedError(f"{what} is not valid base64") from exc
    if what == "proof hash" and len(value) != HASH_SIZE:
        raise MalformedError("proof hash must be 32 bytes", found=len(value))
    return value
