"""The spool: how the Flower ClientApp hands contribution records to the agent (docs/messaging.md).

The ClientApp writes one JSON object per record to `{spool_dir}/{mid}/{unique name}.json` atomically (write a
temporary file not ending in `.json` in the same folder, then rename). The object holds the ContributionReport
fields except `v`, `seq` and `device_time_ms`, which the agent sets when it signs. A record that names drift-correction
hashes is signed as ContributionReportV2, any other as ContributionReport v1 (byte for byte what agents signed before
v2 existed, so coordinators that predate v2 keep taking them). The agent signs and commits the
record into its outbox, then deletes the file; a crash in between is harmless because the outbox remembers the file
name. A file that is too large or does not make a valid report is moved to `rejected/` with the reason beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.errors import MalformedError, TooLargeError
from protocol.identity import SignerKey
from protocol.messages import ContributionReport, ContributionReportV2

MAX_SPOOL_FILE = 16 * 1024
_AGENT_FIELDS = frozenset(("v", "seq", "device_time_ms"))


@dataclass(frozen=True)
class SpoolRecord:
    path: Path
    fields: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name


# protocol.tasks.contribution.RECORD_TYPE; not imported: that package is for training processes.
_CLIENTAPP_RECORD = "application/vnd.midgate.contribution.v1+json"
_FINGERPRINT_SCHEMES = ("merkle-sha256:", "sha256:")
_DRIFT_FIELDS = ("gradient_sha256", "drift_offset_sha256")
_DRIFT_FIELDS_SET = frozenset(_DRIFT_FIELDS)


RoundNonce = str | Callable[[int], str | None] | None
"""The invitation nonce a record's report carries: one nonce, or the nonce for the record's run id
(edge.agent.job_node.JobNode.nonce_for), or None when no invitation was received."""


def report_fields(record: dict[str, Any], round_nonce: RoundNonce) -> dict[str, Any]:
    """The ContributionReport fields for a record the Flower ClientApp wrote (protocol.tasks.contribution): u64s as
    decimal strings, the fingerprint's SHA-256 hex without its scheme prefix, and the nonce of the MID's invitation
    to the record's job (edge.agent.job_node), which the ClientApp does not know."""
    if callable(round_nonce):
        run_id = record.get("run_id")
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            raise MalformedError("ClientApp record without an integer run_id")
        round_nonce = round_nonce(run_id)
    if round_nonce is None:
        raise MalformedError("ClientApp record but no job invitation to take its round nonce from")
    fields = {k: v for k, v in record.items() if k not in ("type", "created_ms")}
    # Null drift hashes (a job without drift correction): the record becomes a v1 report, which has no such fields.
    for key in _DRIFT_FIELDS:
        if fields.get(key, "") is None:
            del fields[key]
    for key in ("run_id", "node_id"):
        if isinstance(fields.get(key), int) and not isinstance(fields.get(key), bool):
            fields[key] = str(fields[key])
    fingerprint = fields.get("dataset_fingerprint")
    if isinstance(fingerprint, str):
        for scheme in _FINGERPRINT_SCHEMES:
            if fingerprint.startswith(scheme):
                fields["dataset_fingerprint"] = fingerprint.removeprefix(scheme)
                break
    fields["round_nonce"] = round_nonce
    return fields


def read_record(path: Path, round_nonce: RoundNonce = None) -> SpoolRecord:
    """Read and pre-check one spool file (the full schema check happens when it is signed). A record in the
    ClientApp's format is translated with `report_fields`."""
    size = path.stat().st_size
    if size > MAX_SPOOL_FILE:
        raise TooLargeError("spool file too large", limit=MAX_SPOOL_FILE, found=size)
    try:
        fields = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedError("spool file is not JSON", file=path.name) from exc
    if not isinstance(fields, dict):
        raise MalformedError("spool record must be a JSON object", file=path.name)
    if fields.get("type") == _CLIENTAPP_RECORD:
        fields = report_fields(fields, round_nonce)
    if _AGENT_FIELDS & fields.keys():
        raise MalformedError("spool record must not set v, seq or device_time_ms", file=path.name)
    build_report(fields, 1, 1_700_000_000_000)
    return SpoolRecord(path, fields)


def report_model(fields: dict[str, Any]) -> type[ContributionReport | ContributionReportV2]:
    """The report version a spool record is signed as: v2 when it names a drift hash (even only one, so that the
    v2 model refuses it for lacking the other), v1 otherwise."""
    return ContributionReportV2 if _DRIFT_FIELDS_SET & fields.keys() else ContributionReport


def build_report(fields: dict[str, Any], seq: int, now_ms: int) -> ContributionReport | ContributionReportV2:
    """The contribution report (v1 or v2, `report_model`) for a spool record with the agent's seq and time."""
    doc = {**fields, "seq": str(seq), "device_time_ms": now_ms}
    try:
        return report_model(fields).model_validate_json(json.dumps(doc))
    except ValueError as exc:
        raise MalformedError("spool record is not a valid contribution report", error=str(exc)[:300]) from None


def sign_report(fields: dict[str, Any], key: SignerKey, seq: int, now_ms: int) -> bytes:
    """The sealed contribution report for a spool record."""
    return build_report(fields, seq, now_ms).seal(key)


def pending_files(directory: Path, limit: int) -> list[Path]:
    """Complete spool files, oldest name first (temporary files do not end in .json)."""
    if not directory.is_dir():
        return []
    names = sorted(e.name for e in os.scandir(directory) if e.is_file() and e.name.endswith(".json"))
    return [directory / n for n in names[:limit]]


def reject_file(path: Path, error: Exception) -> None:
    rejected = path.parent / "rejected"
    rejected.mkdir(exist_ok=True)
    os.replace(path, rejected / path.name)
    (rejected / (path.name + ".error")).write_text(str(error) + "\n")


def write_record(directory: Path, name: str, fields: dict[str, Any]) -> Path:
    """Atomically drop a record into a spool folder (what the ClientApp does; also used by tests and the demo)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{name}.json"
    tmp = directory / f".{name}.tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps(fields).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final
