"""What the agent trusts about its MID's ledger: the last checkpoint it verified, and how it checks receipts.

A receipt counts only if its inclusion proof verifies against a checkpoint signed by the MID key *and* that
checkpoint is consistent with the last one this agent trusts (RFC 9162 consistency proof, fetched from the MID's
HTTP API by edge.agent.ledger_client, which need not be trusted: the proof is checked). The trust rules are
protocol.witness's: `LogView` moves the trusted checkpoint forward (and keeps equivocation evidence),
`verify_older_checkpoint` checks an older one a late receipt names without replacing the trusted one. This module
only adds matching receipts to the reports in the outbox.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.checkpoint import Checkpoint, VerifiedCheckpoint, open_checkpoint, parse_receipt, verify_receipt
from protocol.envelope import decode, envelope_digest, open_envelope
from protocol.errors import InconsistentError, ProtocolError, ReplayedError
from protocol.identity import VerifierKey
from protocol.leaves import Leaf, LeafKind
from protocol.merkle import leaf_hash, verify_inclusion
from protocol.messages import Receipt, ReceiptBatch
from protocol.witness import LogView, verify_older_checkpoint

ConsistencyFetcher = Callable[[int, int], list[bytes]]


@dataclass(frozen=True)
class SettledReport:
    """A report whose receipt verified: where it sits in the log, its inclusion path and the signed checkpoint the
    path leads to (what the agent keeps as the report's receipt, edge.agent.outbox)."""

    seq: int
    leaf_index: int
    tree_size: int
    envelope_sha256: str
    path: tuple[bytes, ...] = ()
    checkpoint: bytes = b""


class LedgerView:
    """Not thread-safe: the agent calls it from its one database thread."""

    def __init__(
        self,
        mid_key: VerifierKey,
        device_key_id: str,
        fetch: ConsistencyFetcher,
        trusted_note: bytes | None,
    ) -> None:
        self.mid_key = mid_key
        self.device_key_id = device_key_id
        self._fetch = fetch
        self.log = LogView(mid_key, trusted_note)
        self._older_roots: dict[int, bytes] = {}

    @property
    def trusted(self) -> Checkpoint | None:
        """The trusted checkpoint, None before the first receipt (enrolment) verified."""
        return None if self.log.note is None else self.log.checkpoint

    @property
    def trusted_note(self) -> bytes | None:
        """The exact signed note of the trusted checkpoint: what the agent persists to resume."""
        return self.log.note

    def check_checkpoint(self, opened: VerifiedCheckpoint) -> bool:
        """Raise if `opened` is inconsistent with the trusted checkpoint; True when it became the new trusted one."""
        new, trusted = opened.checkpoint, self.log.checkpoint
        if self.log.note is not None and new.size == trusted.size and new.root == trusted.root:
            return False
        if new.size >= trusted.size:
            grows = self.log.note is not None and new.size > trusted.size
            self.log.update(opened.note, self._fetch(trusted.size, new.size) if grows else [])
            return True
        if self._older_roots.get(new.size) == new.root:
            return False
        verify_older_checkpoint(new, trusted, self._fetch(new.size, trusted.size))
        if len(self._older_roots) > 4096:
            self._older_roots.clear()
        self._older_roots[new.size] = new.root
        return False

    def settle(self, receipt_envelope: bytes, envelope: bytes, kind: LeafKind, seq: int) -> SettledReport:
        """Verify a signed Receipt (the enrolment grant's) for `envelope` (seq `seq`); raises a ProtocolError."""
        verified = open_envelope(receipt_envelope, {self.mid_key.key_id.hex(): self.mid_key}, Receipt.PAYLOAD_TYPE)
        receipt = decode(verified, Receipt)
        digest = envelope_digest(envelope).hex()
        if receipt.device_key_id != self.device_key_id or receipt.seq != seq or receipt.envelope_sha256 != digest:
            raise ReplayedError("receipt is for another report", seq=seq, receipt_seq=receipt.seq)
        proven = verify_receipt(receipt.tlog_proof, Leaf(kind, envelope).encode(), self.mid_key)
        if proven.index != receipt.leaf_index:
            raise InconsistentError(
                "receipt index differs from its proof", index=receipt.leaf_index, proof=proven.index
            )
        self.check_checkpoint(proven.checkpoint)
        path = parse_receipt(receipt.tlog_proof).proof
        return SettledReport(seq, proven.index, proven.checkpoint.checkpoint.size, digest, path, proven.checkpoint.note)

    def settle_batch(self, batch: ReceiptBatch, held: Callable[[int], HeldReport | None]) -> BatchOutcome:
        """Verify a ReceiptBatch against the reports this device holds (`held(seq)`: kind and envelope, or None).

        The checkpoint's signature is checked once and its consistency with the trusted one once, and only when the
        batch names a report still held (a receipt resent for a settled report costs no proof fetch). A path that
        does not prove the held bytes is refused on its own; a bad checkpoint refuses the whole batch.
        """
        wanted = [(entry, report) for entry in batch.receipts if (report := held(entry.seq)) is not None]
        outcome = BatchOutcome()
        if not wanted:
            return outcome
        opened = open_checkpoint(batch.checkpoint.encode(), self.mid_key)
        self.check_checkpoint(opened)
        size, root = opened.checkpoint.size, opened.checkpoint.root
        for entry, (kind, envelope) in wanted:
            try:
                path = tuple(base64.b64decode(h) for h in entry.path)
                verify_inclusion(entry.leaf_index, size, leaf_hash(Leaf(kind, envelope).encode()), path, root)
            except ProtocolError as exc:
                outcome.refused.append((entry.seq, exc))
                continue
            digest = envelope_digest(envelope).hex()
            outcome.settled.append(SettledReport(entry.seq, entry.leaf_index, size, digest, path, opened.note))
        return outcome


HeldReport = tuple[LeafKind, bytes]


@dataclass
class BatchOutcome:
    settled: list[SettledReport] = field(default_factory=list)
    refused: list[tuple[int, ProtocolError]] = field(default_factory=list)


__all__ = [
    "BatchOutcome",
    "ConsistencyFetcher",
    "LedgerView",
    "ProtocolError",
    "SettledReport",
]
