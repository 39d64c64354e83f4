"""Signed contribution reports: devices seal them, the coordinator verifies first and parses second, and refuses
forgeries, unknown keys, replays, oversized envelopes and reports naming an update it never received.

The checks are the protocol functions the coordinator's ingest runs (protocol.envelope, protocol.messages); only
the MQTT transport and the ingest service around them are left out of the demo.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from demo.checks import Outcomes, reason_of
from demo.training import Arrays, LocalUpdate
from protocol.envelope import KeyRing, decode, open_envelope
from protocol.errors import Reason, UpdateMismatchError
from protocol.identity import SignerKey, load_signer_key
from protocol.messages import ContributionReport, require_newer_seq
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.spec import PLAID_APPLIANCE as TASK

MAX_ENVELOPE_BYTES = 64 * 1024  # open_envelope's limit, checked before parsing


def round_nonce() -> str:
    """The coordinator's fresh 128-bit nonce for a round."""
    return secrets.token_hex(16)


def seal_report(
    key: SignerKey,
    update: LocalUpdate,
    *,
    run_id: int,
    round_index: int,
    node_id: int,
    seq: int,
    nonce: str,
    fingerprint_hex: str,
) -> tuple[ContributionReport, bytes]:
    report = ContributionReport(
        run_id=run_id,
        round=round_index,
        node_id=node_id,
        seq=seq,
        device_time_ms=int(time.time() * 1000),
        task_id=TASK.id,
        task_version=TASK.version,
        round_nonce=nonce,
        global_model_sha256=arrays_sha256(update.received),
        update_sha256=arrays_sha256(update.returned),
        examples=update.examples_claimed,
        dataset_fingerprint=fingerprint_hex,
        loss_before=update.loss_before,
        loss_after=update.loss_after,
        seconds=round(update.seconds, 3),
    )
    return report, report.seal(key)


@dataclass
class IngestChecks:
    """The coordinator's checks of one report before it is logged: signature by an enrolled key, schema, the global
    model and update it names are the ones exchanged (as coordinator.gate.update_check does for Flower's
    captures), and a strictly newer seq for that key."""

    ring: KeyRing
    last_seq: dict[str, int] = field(default_factory=dict)

    def accept(
        self, envelope: bytes, delivered: Arrays | None = None, sent: Arrays | None = None
    ) -> ContributionReport:
        """The report, if it passes; otherwise the typed refusal, and nothing is remembered."""
        verified = open_envelope(envelope, self.ring, ContributionReport.PAYLOAD_TYPE)
        report = decode(verified, ContributionReport)
        if sent is not None and report.global_model_sha256 != arrays_sha256(sent):
            raise UpdateMismatchError(
                "report names another global model", expected=arrays_sha256(sent), found=report.global_model_sha256
            )
        if delivered is not None and report.update_sha256 != arrays_sha256(delivered):
            raise UpdateMismatchError(
                "report names another update", expected=arrays_sha256(delivered), found=report.update_sha256
            )
        require_newer_seq(self.last_seq.get(verified.key_id), report.seq, verified.key_id)
        self.last_seq[verified.key_id] = report.seq
        return report


def tampered(envelope: bytes) -> bytes:
    """A copy with one payload bit flipped and the signature left as it was."""
    doc = json.loads(envelope)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[len(payload) // 2] ^= 0x01
    doc["payload"] = base64.b64encode(payload).decode()
    return json.dumps(doc, separators=(",", ":")).encode()


def show_rejections(
    checks: IngestChecks,
    accepted: tuple[ContributionReport, bytes, Arrays],
    signer: SignerKey,
    key_file: Path,
    outcomes: Outcomes,
    console: Console,
) -> None:
    """Replay what an attacker or a broken device could send, after `accepted` was logged; each must be refused
    with its reason code and change nothing."""
    report, envelope, delivered = accepted
    stranger = SignerKey.generate("household-x")
    next_seq = report.seq + 1000
    lying = report.model_copy(update={"seq": next_seq, "update_sha256": "00" * 32})

    def insecure_key_file() -> None:
        os.chmod(key_file, 0o644)
        try:
            load_signer_key(key_file)
        finally:
            os.chmod(key_file, 0o600)

    attempts: list[tuple[str, Reason, Callable[[], object]]] = [
        ("a copy with one payload bit flipped", Reason.BAD_SIGNATURE, lambda: checks.accept(tampered(envelope))),
        (
            "the report signed by a key the MID never enrolled",
            Reason.UNKNOWN_KEY,
            lambda: checks.accept(report.seal(stranger)),
        ),
        (
            f"the same report delivered again (seq {report.seq} again)",
            Reason.REPLAYED,
            lambda: checks.accept(envelope, delivered),
        ),
        ("an envelope larger than 64 KiB", Reason.TOO_LARGE, lambda: checks.accept(b" " * (MAX_ENVELOPE_BYTES + 1))),
        (
            "a report naming an update the coordinator never received",
            Reason.UPDATE_MISMATCH,
            lambda: checks.accept(lying.seal(signer), delivered),
        ),
        (f"{signer.name}'s private key file after chmod 644", Reason.INSECURE_KEY_FILE, insecure_key_file),
    ]
    table = Table("attempt", "expected", "got", "detail", title="what the coordinator refuses")
    for label, expected, attempt in attempts:
        got, detail = reason_of(attempt)
        style = "green" if got == str(expected) else "bold red"
        table.add_row(label, str(expected), f"[{style}]{got}[/]", detail)
        outcomes.record(label, expected, got)
    console.print(table)
