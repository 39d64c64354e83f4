"""The JobRequest the job-start tests build: a two-round PLAID job for buyer acme's research, its validation file
an empty stand-in (these tests never train)."""

from __future__ import annotations

from pathlib import Path

from coordinator.federation.job_start import JobRequest


def job_request(tmp_path: Path, **overrides: object) -> JobRequest:
    validation = tmp_path / "validation.npz"
    validation.write_bytes(b"")
    fields: dict[str, object] = {
        "job_id": "job-1",
        "task_id": "plaid-appliance",
        "task_version": 1,
        "rounds": 2,
        "validation_path": validation,
        "purpose": "research",
        "buyer": "acme",
        "min_nodes": 1,
    }
    return JobRequest.model_validate(fields | overrides)
