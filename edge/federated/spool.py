"""The spool: the folder through which the Flower ClientApp hands each round's contribution to the agent.

The ClientApp writes (`write_body`), the agent reads (`pending_files`, `read_record`), and this module is the whole
contract between them (docs/messaging.md):

- One file per run, round and node, `run{run}-round{round:06d}-node{node}.json`, holding exactly the
  `canonical_json` of a `protocol.messages.ContributionBody`: the contribution report without what the agent adds
  when it signs (seq, device time, round nonce).
- Written to a temporary name that starts with `.` and does not end in `.json`, fsynced, renamed into place and the
  folder fsynced, so the agent only ever sees complete bodies and a power cut never loses one it was told of.
- The agent checks the size before parsing, parses the body strictly, and signs it with the nonce of the MID's
  invitation to the body's run (`RoundNonces`, edge.agent.job_node.JobNode.nonce_for). It commits the signed report
  to its outbox under the file's name and only then deletes the file: a crash in between is harmless, because the
  outbox knows the name and the next pass only deletes the file.
- A file that is too large, is not a valid body, or names a run no invitation named is moved to `rejected/` with
  the reason in a `.error` file beside it, and never sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge.durable_file import replace_file
from protocol.errors import MalformedError, TooLargeError
from protocol.identity import SignerKey
from protocol.messages import MAX_CONTRIBUTION_BODY_BYTES, ContributionBody, ContributionReport

SUFFIX = ".json"
REJECTED = "rejected"

RoundNonces = Callable[[int], str | None]
"""Run id -> the nonce of the MID's invitation to that run's job, or None when no invitation named it."""


def spool_name(body: ContributionBody) -> str:
    """The file name of `body`: one per run, round and node, so a record is never taken twice under two names."""
    return f"run{body.run_id}-round{body.round:06d}-node{body.node_id}{SUFFIX}"


def write_body(spool_dir: Path, body: ContributionBody) -> Path:
    """Write the body's exact JSON bytes atomically and durably into `spool_dir`; returns the final path."""
    final = spool_dir / spool_name(body)
    replace_file(final, body.canonical_json())
    return final


def pending_files(spool_dir: Path, limit: int) -> list[Path]:
    """Up to `limit` complete spool files, oldest name first (temporary files start with `.`)."""
    if not spool_dir.is_dir():
        return []
    names = sorted(
        e.name for e in os.scandir(spool_dir) if e.is_file() and e.name.endswith(SUFFIX) and not e.name.startswith(".")
    )
    return [spool_dir / n for n in names[:limit]]


@dataclass(frozen=True)
class SpooledRecord:
    """A spool file's body and the round nonce the agent signs it with."""

    path: Path
    body: ContributionBody
    round_nonce: str

    def seal(self, key: SignerKey, seq: int, device_time_ms: int) -> bytes:
        """The signed ContributionReport: the body with the outbox's seq, the device time and the round nonce."""
        report = ContributionReport.from_body(
            self.body, seq=seq, device_time_ms=device_time_ms, round_nonce=self.round_nonce
        )
        return report.seal(key)


def read_record(path: Path, round_nonces: RoundNonces) -> SpooledRecord:
    """Read one spool file. Raises TooLargeError (checked before reading), MalformedError (not a valid body, or no
    invitation named its run) or OSError."""
    size = path.stat().st_size
    if size > MAX_CONTRIBUTION_BODY_BYTES:
        raise TooLargeError("spool file too large", limit=MAX_CONTRIBUTION_BODY_BYTES, found=size)
    body = ContributionBody.parse(path.read_bytes())
    nonce = round_nonces(body.run_id)
    if nonce is None:
        raise MalformedError(
            "no job invitation named the record's run to take its round nonce from", run_id=body.run_id
        )
    return SpooledRecord(path, body, nonce)


def reject_file(path: Path, error: Exception) -> None:
    """Move a spool file the agent will never send to `rejected/`, with the reason beside it."""
    rejected = path.parent / REJECTED
    rejected.mkdir(exist_ok=True)
    os.replace(path, rejected / path.name)
    (rejected / (path.name + ".error")).write_text(str(error) + "\n")
