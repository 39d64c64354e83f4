"""The spool directory through which the ClientApp hands contribution records to the agent's outbox.

Contract with the agent: one JSON file per (run, round, node), written to a temporary name and renamed into place,
so the agent only ever sees complete records; the agent signs and sends a file, then deletes it once it holds a
"""

from __future__ import annotations

import os
from pathlib import Path

from protocol.tasks.contribution import ContributionRecord

SUFFIX = ".contribution.json"


def record_path(spool_dir: Path, record: ContributionRecord) -> Path:
    return spool_dir / f"run{record.run_id}-round{record.round:06d}-node{record.node_id}{SUFFIX}"


def write_record(spool_dir: Path, record: ContributionRecord) -> Path:
    """Write the record's exact JSON bytes atomically into `spool_dir`; returns the final path."""
    spool_dir.mkdir(parents=True, exist_ok=True)
    final = record_path(spool_dir, record)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    data = record.to_json_bytes()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dir_fd = os.open(spool_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut before the agent is told
    finally:
        os.close(dir_fd)
    return final


def pending_records(spool_dir: Path) -> list[Path]:
    """Complete records waiting for the agent, oldest name first."""
    if not spool_dir.is_dir():
        return []
    return sorted(p for p in spool_dir.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))
