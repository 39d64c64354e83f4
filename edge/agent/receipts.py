"""`midgate agent receipts [--verify]`: the member's own record of what the device sent and what the MID logged.

Every kept receipt is first checked on its own, offline: the envelope is this device's key's signature over a
message of its kind with the kept seq, and the kept inclusion path proves `Leaf(kind, envelope)` at the kept index
under the kept checkpoint, which the MID key signed. A stored envelope or receipt changed by a single bit fails here.

Then against the log as the witnesses see it: the latest witnessed checkpoint (`GET /v1/checkpoint/witnessed`) must
carry the quorum of cosignatures the witness list states (`GET /v1/witnesses`) and be consistent with the agent's
trusted checkpoint, and every kept checkpoint must be a prefix of it (one consistency proof per distinct tree size).
A receipt under a checkpoint newer than the witnessed one is `awaiting witnesses`: the witnesses have not yet
cosigned a tree that holds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from edge.agent.ledger_client import LedgerClient, ProofUnavailableError
from edge.agent.ledger_view import LedgerView
from edge.agent.membership import Membership
from edge.agent.outbox import LEAF_KIND, KeptReceipt, Outbox
from protocol.checkpoint import VerifiedCheckpoint, open_checkpoint
from protocol.envelope import decode, envelope_digest, open_envelope, peek_envelope
from protocol.errors import InconsistentError, MalformedError, ProtocolError, ReplayedError
from protocol.identity import VerifierKey
from protocol.leaves import Leaf
from protocol.merkle import leaf_hash, verify_inclusion
from protocol.topics import MESSAGE_BY_UP_KIND, UpKind
from protocol.witness import verify_older_checkpoint

# rich only for the command's table: the member page lays receipts out itself, and an agent whose page was visited
# would keep rich resident (BENCHMARKS.md, "Raspberry Pi hub").
if TYPE_CHECKING:
    from rich.table import Table


class ReceiptStatus(StrEnum):
    WITNESSED = "witnessed"
    """Proven offline, and under a checkpoint a quorum of witnesses cosigned."""
    PROVEN = "proven"
    """Proven offline; not checked against the witnessed log (no --verify)."""
    AWAITING_WITNESSES = "awaiting witnesses"
    REFUSED = "refused"
    NOT_KEPT = "not kept"
    """Receipted before the agent kept envelopes and proofs: nothing to check."""


@dataclass(frozen=True)
class ReceiptCheck:
    receipt: KeptReceipt
    status: ReceiptStatus
    detail: str = ""


def prove_kept(receipt: KeptReceipt, device_key: VerifierKey, mid_key: VerifierKey) -> VerifiedCheckpoint:
    """Check one kept receipt offline; returns its checkpoint. Raises a ProtocolError naming what does not hold."""
    assert receipt.kind is not None and receipt.envelope is not None and receipt.path is not None
    if receipt.checkpoint is None:
        raise MalformedError("the receipt's checkpoint is not kept", tree_size=receipt.tree_size)
    envelope = receipt.envelope
    if envelope_digest(envelope).hex() != receipt.envelope_sha256:
        raise ReplayedError("kept envelope differs from the one receipted", seq=receipt.seq)
    payload_type = peek_envelope(envelope)[0]
    models = [m for m in MESSAGE_BY_UP_KIND[UpKind(receipt.kind)] if payload_type == m.PAYLOAD_TYPE]
    if not models:
        raise MalformedError("kept envelope is not a message of its kind", kind=receipt.kind, found=payload_type)
    message = decode(open_envelope(envelope, {device_key.key_id.hex(): device_key}, payload_type), models[0])
    if getattr(message, "seq", None) != receipt.seq:
        raise ReplayedError("kept envelope carries another seq", seq=receipt.seq, found=getattr(message, "seq", None))
    opened = open_checkpoint(receipt.checkpoint, mid_key)
    checkpoint = opened.checkpoint
    if checkpoint.size != receipt.tree_size:
        raise InconsistentError("kept checkpoint is of another size", expected=receipt.tree_size, found=checkpoint.size)
    leaf = Leaf(LEAF_KIND[receipt.kind], envelope).encode()
    verify_inclusion(receipt.leaf_index, checkpoint.size, leaf_hash(leaf), receipt.path, checkpoint.root)
    return opened


def check_offline(
    receipts: Iterable[KeptReceipt], device_key: VerifierKey, mid_key: VerifierKey
) -> tuple[list[ReceiptCheck], dict[int, VerifiedCheckpoint]]:
    """Each receipt proven on its own; returns the checks and the checkpoints of the proven ones by seq."""
    checks: list[ReceiptCheck] = []
    proven: dict[int, VerifiedCheckpoint] = {}
    for receipt in receipts:
        if receipt.envelope is None or receipt.kind is None or receipt.path is None:
            checks.append(ReceiptCheck(receipt, ReceiptStatus.NOT_KEPT))
            continue
        try:
            proven[receipt.seq] = prove_kept(receipt, device_key, mid_key)
        except (ProtocolError, ValueError) as exc:
            checks.append(ReceiptCheck(receipt, ReceiptStatus.REFUSED, str(exc)))
            continue
        checks.append(ReceiptCheck(receipt, ReceiptStatus.PROVEN))
    return checks, proven


def check_witnessed(
    checks: list[ReceiptCheck], proven: dict[int, VerifiedCheckpoint], view: LedgerView, client: LedgerClient
) -> tuple[VerifiedCheckpoint, list[ReceiptCheck]]:
    """Bind the proven receipts to the latest witnessed checkpoint; returns it and the checks updated.

    Raises a ProtocolError when the witnessed checkpoint lacks its quorum or is not consistent with the trusted one,
    ProofUnavailableError when the MID cannot be asked.
    """
    policy = client.witnesses().policy()
    witnessed = policy.check(client.witnessed_checkpoint(), view.mid_key)
    view.check_checkpoint(witnessed)
    top = witnessed.checkpoint
    prefix: dict[int, ProtocolError | None] = {}
    updated = []
    for check in checks:
        opened = proven.get(check.receipt.seq)
        if check.status is not ReceiptStatus.PROVEN or opened is None:
            updated.append(check)
            continue
        checkpoint = opened.checkpoint
        if checkpoint.size > top.size:
            updated.append(ReceiptCheck(check.receipt, ReceiptStatus.AWAITING_WITNESSES, f"witnessed: {top.size}"))
            continue
        if checkpoint.size not in prefix:
            try:
                proof = client.consistency(checkpoint.size, top.size) if checkpoint.size < top.size else []
                verify_older_checkpoint(checkpoint, top, proof)
                prefix[checkpoint.size] = None
            except ProtocolError as exc:
                prefix[checkpoint.size] = exc
        error = prefix[checkpoint.size]
        if error is None:
            updated.append(ReceiptCheck(check.receipt, ReceiptStatus.WITNESSED, f"under {top.size}"))
        else:
            updated.append(ReceiptCheck(check.receipt, ReceiptStatus.REFUSED, str(error)))
    return witnessed, updated


@dataclass
class MembershipReceipts:
    """What `midgate agent receipts` prints for one membership."""

    mid: str
    checks: list[ReceiptCheck]
    witnessed_size: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.status is not ReceiptStatus.REFUSED for c in self.checks)

    def table(self) -> Table:
        from rich.table import Table

        title = f"{self.mid}: {len(self.checks)} receipts kept"
        if self.witnessed_size is not None:
            title += f"; latest witnessed checkpoint: size {self.witnessed_size}"
        table = Table("seq", "kind", "leaf", "tree size", "receipted", "status", "detail", title=title)
        for check in self.checks:
            r = check.receipt
            received = datetime.fromtimestamp(r.received_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            table.add_row(
                str(r.seq), r.kind or "-", str(r.leaf_index), str(r.tree_size), received, check.status, check.detail
            )
        if not self.checks:
            table.add_row("-", "-", "-", "-", "-", "no receipts yet", "")
        return table


def verify_membership_receipts(
    membership: Membership, outbox_max_bytes: int, against_witnesses: bool
) -> MembershipReceipts:
    """Every receipt kept for `membership`, proven offline, and with `against_witnesses` bound to the latest witnessed
    checkpoint (asks the MID). Failures are in the result, never raised."""
    outbox = Outbox(membership.outbox_path, outbox_max_bytes)
    try:
        kept, trusted = outbox.kept_receipts(), outbox.get_meta("trusted_checkpoint")
    finally:
        outbox.close()
    checks, proven = check_offline(kept, membership.key.verifier, membership.mid_key)
    report = MembershipReceipts(membership.mid, checks)
    if not against_witnesses:
        return report
    client = LedgerClient(membership.record.enrolment_url)
    view = LedgerView(membership.mid_key, membership.key.key_id.hex(), client.consistency, trusted)
    try:
        witnessed, report.checks = check_witnessed(checks, proven, view, client)
        report.witnessed_size = witnessed.checkpoint.size
    except ProofUnavailableError as exc:
        report.problems.append(f"the witnessed checkpoint could not be had: {exc}")
    except ProtocolError as exc:
        report.problems.append(f"the witnessed checkpoint is refused: {exc}")
    return report
