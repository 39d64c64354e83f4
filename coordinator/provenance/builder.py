"""Build and sign a settled job's provenance manifest from the MID's log (format: protocol/provenance.py).

Everything a manifest states is read from the log or recomputed, never taken from the job book: the JOB leaf (model
arrays hash, task, purpose, buyer, rounds, run), the SETTLEMENT leaf (members), the contribution leaves of the job's
run before the settlement, and the latest signed checkpoint with both leaves' inclusion proofs. The model file is the
ServerApp's `final-model.npz` of the job's run; its arrays must hash to the JOB leaf's `final_model_sha256`, or no
manifest is issued. Reads the log read-only (LedgerReader), so the command runs beside `serve`. Blocking.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from coordinator.ledger.store import LedgerReader
from coordinator.provenance.log_index import LogIndex
from coordinator.royalties.ledger_records import settlement_record_id
from coordinator.royalties.settlement import decode_record
from protocol.checkpoint import parse_checkpoint_text
from protocol.errors import ModelMismatchError, UnknownModelError
from protocol.identity import SignerKey
from protocol.job_log import JobLogRecord, decode_job_record
from protocol.leaves import LeafKind, decode_leaf
from protocol.note import parse_note
from protocol.provenance import (
    ContributionSet,
    Manifest,
    ModelFile,
    PurposeTerms,
    TaskRef,
    contribution_root,
    file_sha256,
    job_contribution_leaves,
    leaf_inclusion,
    model_arrays_sha256,
    seal_manifest,
)
from protocol.tasks.spec import TaskSpec

FINAL_MODEL_FILE = "final-model.npz"


@dataclass(frozen=True)
class SettledJob:
    """A job's JOB and SETTLEMENT leaves as the log holds them."""

    job: JobLogRecord
    job_index: int
    job_leaf: bytes
    settlement_index: int
    settlement_leaf: bytes
    members: tuple[str, ...]


def find_settled_job(reader: LedgerReader, job_id: str, index: LogIndex | None = None) -> SettledJob:
    """The job's JOB leaf and its SETTLEMENT leaf; UnknownModelError when the log holds no completed job of this id
    or no settlement of it yet. With `index` (updated to the reader's size) only those two leaves are read."""
    if index is not None:
        return _indexed_settled_job(reader, job_id, index)
    record_id = settlement_record_id(job_id)
    job: tuple[int, bytes, JobLogRecord] | None = None
    for index_, data in reader.leaves(0, reader.size):
        leaf = decode_leaf(data)
        if leaf.kind is LeafKind.JOB and job is None:
            logged = decode_job_record(leaf.signed)
            if logged.job_id == job_id:
                job = (index_, data, logged)
        elif leaf.kind is LeafKind.SETTLEMENT and job is not None:
            record = decode_record(leaf.signed)
            if record.inputs.record_id == record_id:
                members = tuple(m.member for m in record.inputs.attribution.members)
                return SettledJob(job[2], job[0], job[1], index_, data, members)
    return _unsettled(job, job_id, reader.size)


def _indexed_settled_job(reader: LedgerReader, job_id: str, index: LogIndex) -> SettledJob:
    found = index.first_job(job_id)
    if found is None:
        return _unsettled(None, job_id, reader.size)
    job_leaf = reader.leaf(found)
    logged = decode_job_record(decode_leaf(job_leaf).signed)
    settled = index.settlement_after(settlement_record_id(job_id), found)
    if settled is None:
        return _unsettled((found, job_leaf, logged), job_id, reader.size)
    data = reader.leaf(settled)
    record = decode_record(decode_leaf(data).signed)
    members = tuple(m.member for m in record.inputs.attribution.members)
    return SettledJob(logged, found, job_leaf, settled, data, members)


def _unsettled(job: tuple[int, bytes, JobLogRecord] | None, job_id: str, size: int) -> SettledJob:
    if job is None:
        raise UnknownModelError("no JOB leaf for this job in the log", job=job_id, size=size)
    if job[2].status != "completed":
        raise UnknownModelError("the job did not complete: it has no model", job=job_id, status=job[2].status)
    raise UnknownModelError("the job is not settled yet (`midgate coordinator job settle`)", job=job_id)


def model_file_path(jobs_dir: Path, run_id: int) -> Path:
    """Where the ServerApp left a run's final model (coordinator/federation/server_app.py)."""
    return jobs_dir / f"run-{run_id}" / FINAL_MODEL_FILE


def build_manifest(
    reader: LedgerReader,
    job_id: str,
    *,
    mid: str,
    mid_key: SignerKey,
    model_path: Path,
    spec: TaskSpec,
    purpose: PurposeTerms,
    now_ms: int,
    index: LogIndex | None = None,
) -> bytes:
    """The signed manifest (DSSE envelope bytes) of a settled job, against the log's latest checkpoint.

    Raises UnknownModelError (no such completed, settled job), ModelMismatchError (the model file's arrays are not
    the JOB leaf's model), MalformedError (the spec is not the job's task). With `index` (updated to the reader's
    size) the log is not scanned: only the leaves the manifest cites are read.
    """
    settled = find_settled_job(reader, job_id, index)
    job = settled.job
    if (spec.id, spec.version) != (job.task_id, job.task_version):
        raise ModelMismatchError("the task spec is not the job's", expected=f"{job.task_id}@{job.task_version}")
    if job.run_id is None or job.final_model_sha256 is None or job.model_version is None:
        raise UnknownModelError("the JOB leaf names no model", job=job_id)
    sha256, size = file_sha256(model_path)
    arrays = model_arrays_sha256(model_path)
    if arrays != job.final_model_sha256:
        raise ModelMismatchError(
            "the model file is not the job's final model", expected=job.final_model_sha256, found=arrays
        )
    # The checkpoint at the size this reader opened with: `serve` may append (and sign a larger one) meanwhile, and
    # this reader can prove inclusion only in the tree it knows.
    note = reader.checkpoint(reader.size)
    size_now = parse_checkpoint_text(parse_note(note).text).size
    if index is None:
        leaves = reader.leaves(0, settled.settlement_index)
    else:
        leaves = ((i, reader.leaf(i)) for i in index.contributions(job.run_id, settled.settlement_index))
    root, count = contribution_root(job_contribution_leaves(leaves, job.run_id, settled.settlement_index))
    manifest = Manifest(
        mid=mid,
        log_origin=reader.origin,
        job_id=job.job_id,
        model_version=job.model_version,
        model=ModelFile(name=model_path.name, sha256=sha256, size_bytes=size, arrays_sha256=arrays),
        task=TaskRef(id=spec.id, version=spec.version, spec_sha256=hashlib.sha256(spec.canonical_json()).hexdigest()),
        purpose=purpose,
        buyer=job.buyer,
        rounds=job.rounds,
        rounds_completed=job.rounds_completed,
        members=settled.members,
        contributions=ContributionSet(run_id=job.run_id, count=count, before_index=settled.settlement_index, root=root),
        job_leaf=leaf_inclusion(
            settled.job_index, settled.job_leaf, reader.inclusion_proof(settled.job_index, size_now)
        ),
        settlement_leaf=leaf_inclusion(
            settled.settlement_index,
            settled.settlement_leaf,
            reader.inclusion_proof(settled.settlement_index, size_now),
        ),
        checkpoint=note.decode(),
        issued_ms=now_ms,
    )
    return seal_manifest(manifest, mid_key)
