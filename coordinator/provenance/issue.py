"""Issue a settled job's manifest once and keep it: what `coordinator job manifest` and the buyer API's delivery call.

Blocking (SQLite reads, signing, file writes): async callers use asyncio.to_thread. It reads the log read-only, so it
runs in `serve` or beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.config import CoordinatorSettings
from coordinator.ledger.store import LedgerReader
from coordinator.mid_key import load_or_create_mid_key
from coordinator.provenance.builder import build_manifest, find_settled_job, model_file_path
from coordinator.provenance.log_index import LogIndex
from coordinator.provenance.shelf import ManifestShelf
from coordinator.provenance.terms import purpose_terms
from coordinator.tasks.catalogue import TaskCatalogue
from protocol.errors import MalformedError
from protocol.identity import SignerKey


def issue_manifest(settings: CoordinatorSettings, job_id: str, model_path: Path | None = None) -> bytes:
    """The job's signed manifest (DSSE envelope bytes): the one issued before, or a new one built from the log and
    kept. `model_path` defaults to the run's final-model.npz under jobs_dir. Raises ProtocolError (unknown_model: no
    completed, settled job; model_mismatch: the file is not the job's model; unknown_task) or OSError."""
    mid_key = load_or_create_mid_key(settings.mid_key_file, settings.mid)
    shelf = ManifestShelf(settings.manifests_dir, mid_key.verifier)
    kept = shelf.get(job_id)
    if kept is not None:
        return kept
    if not settings.ledger_path.exists():
        raise MalformedError("no ledger yet: `coordinator serve` has not run", path=str(settings.ledger_path))
    now_ms = time.time_ns() // 1_000_000
    index = LogIndex(settings.manifests_dir / "log-index.sqlite")
    try:
        with LedgerReader.open_existing(settings.ledger_path) as reader:
            index.update(reader)
            return shelf.put(job_id, _build(settings, reader, index, mid_key, job_id, model_path, now_ms))
    finally:
        index.close()


def _build(
    settings: CoordinatorSettings,
    reader: LedgerReader,
    index: LogIndex,
    mid_key: SignerKey,
    job_id: str,
    model_path: Path | None,
    now_ms: int,
) -> bytes:
    """The manifest built from the log, its leaves found through `index`."""
    job = find_settled_job(reader, job_id, index).job
    catalogue = TaskCatalogue(settings.tasks_path, mid_key, now_ms)
    try:
        spec = catalogue.get(job.task_id, job.task_version).spec
    finally:
        catalogue.close()
    envelope = build_manifest(
        reader,
        job_id,
        mid=settings.mid,
        mid_key=mid_key,
        model_path=model_path or model_file_path(settings.jobs_dir, job.run_id or 0),
        spec=spec,
        purpose=purpose_terms(settings, reader, job.purpose, job.started_ms),
        now_ms=now_ms,
        index=index,
    )
    return envelope
