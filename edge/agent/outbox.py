"""The agent's store-and-forward outbox: one SQLite file per membership, `synchronous=FULL`.

A report is signed with the next `seq` and committed here before it is ever published, and it leaves only when the
agent holds a receipt whose inclusion proof verified (a broker PUBACK is not durability: a SIGKILLed Mosquitto loses
QoS 1 messages it had acknowledged). `next_seq` is persisted in the same transaction as the row, so a reboot never
reuses a seq. Spool file names are recorded with the row so that a crash between the commit and the unlink of a
spool file cannot enqueue the same record twice.

A receipted report moves to `receipts` with everything needed to prove it again later, offline: its exact envelope,
its leaf index, its inclusion path and (in `checkpoints`, once per tree size) the MID-signed checkpoint the path
leads to. That is the member's own record of what it sent and what the MID logged (`midgate agent receipts`,
edge.agent.receipts); rows receipted before this was kept have no envelope, path or checkpoint.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge.agent.ledger_view import SettledReport
from edge.sqlite_cache import bound_page_cache
from protocol.envelope import envelope_digest
from protocol.leaves import LeafKind
from protocol.topics import UpKind

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB);
INSERT OR IGNORE INTO meta VALUES ('next_seq', 1);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    envelope BLOB NOT NULL,
    spool_name TEXT UNIQUE,
    created_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_send_ms INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(next_send_ms);
CREATE TABLE IF NOT EXISTS receipts (
    seq INTEGER PRIMARY KEY,
    leaf_index INTEGER NOT NULL,
    tree_size INTEGER NOT NULL,
    envelope_sha256 TEXT NOT NULL,
    spool_name TEXT UNIQUE,
    received_ms INTEGER NOT NULL
);
-- The MID-signed checkpoints receipts lead to, once per tree size.
CREATE TABLE IF NOT EXISTS checkpoints (size INTEGER PRIMARY KEY, note BLOB NOT NULL);
-- Reports the MID refused for good (a MID-signed Refusal bound to the envelope's hash): kept for the member to see,
-- never resent.
CREATE TABLE IF NOT EXISTS refused (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    envelope BLOB NOT NULL,
    envelope_sha256 TEXT NOT NULL,
    spool_name TEXT UNIQUE,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    refused_ms INTEGER NOT NULL
);
"""
# Added to `receipts` after its first version (ALTER TABLE on open): the kept report and its inclusion path
# (concatenated 32-byte hashes, leaf sibling first).
_RECEIPT_COLUMNS = (("kind", "TEXT"), ("envelope", "BLOB"), ("path", "BLOB"))
_HASH = 32
LEAF_KIND = {
    UpKind.REPORT.value: LeafKind.CONTRIBUTION,
    UpKind.STRIKE.value: LeafKind.STRIKE,
    UpKind.ENROL.value: LeafKind.ENROL,
    UpKind.LEAVE.value: LeafKind.LEAVE,
    UpKind.KNOB.value: LeafKind.KNOB,
    UpKind.CONSENT.value: LeafKind.CONSENT,
}
"""The ledger leaf each kind of kept message is logged as: its receipt proves `Leaf(LEAF_KIND[kind], envelope)`."""


@dataclass(frozen=True)
class PendingReport:
    seq: int
    kind: str
    envelope: bytes
    attempts: int


@dataclass(frozen=True)
class OutboxUsage:
    pending: int
    pending_bytes: int
    receipted: int
    """Messages sent through the outbox and receipted (the kept enrolment receipt is not one)."""
    refused: int = 0


@dataclass(frozen=True)
class RefusedReport:
    """A report the MID refused for good, with its reason code and the MID's detail."""

    seq: int
    kind: str
    envelope: bytes
    reason: str
    detail: str
    refused_ms: int


@dataclass(frozen=True)
class KeptReceipt:
    """A receipted report as kept: its envelope, where the MID logged it, and the proof of that."""

    seq: int
    kind: str | None
    envelope: bytes | None
    envelope_sha256: str
    leaf_index: int
    tree_size: int
    path: tuple[bytes, ...] | None
    checkpoint: bytes | None
    received_ms: int


class OutboxFullError(Exception):
    """The outbox reached its disk bound; new records wait in the spool until receipts free space."""


class Outbox:
    """Synchronous; the daemon calls it from one dedicated thread so the event loop never blocks on fsync."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        bound_page_cache(self._db)
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(receipts)")}
        for name, sql_type in _RECEIPT_COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE receipts ADD COLUMN {name} {sql_type}")
        self._pending_bytes = int(
            self._db.execute("SELECT COALESCE(SUM(LENGTH(envelope)), 0) FROM outbox").fetchone()[0]
        )

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def knows_spool_name(self, spool_name: str) -> bool:
        """True when this spool file was already taken in (its unlink may have been lost to a crash)."""
        q = (
            "SELECT 1 FROM outbox WHERE spool_name = ? UNION ALL SELECT 1 FROM receipts WHERE spool_name = ?"
            " UNION ALL SELECT 1 FROM refused WHERE spool_name = ? LIMIT 1"
        )
        return self._db.execute(q, (spool_name, spool_name, spool_name)).fetchone() is not None

    def enqueue(self, kind: str, sign: Callable[[int], bytes], now_ms: int, spool_name: str | None = None) -> int:
        """Allocate the next seq, sign with it (`sign(seq) -> envelope`), and commit row + counter together."""
        with self._txn() as db:
            seq = int(db.execute("SELECT value FROM meta WHERE name = 'next_seq'").fetchone()[0])
            envelope = sign(seq)
            if self._pending_bytes + len(envelope) > self.max_bytes:
                raise OutboxFullError(f"outbox holds {self._pending_bytes} bytes, bound {self.max_bytes}")
            db.execute("UPDATE meta SET value = ? WHERE name = 'next_seq'", (seq + 1,))
            db.execute(
                "INSERT INTO outbox (seq, kind, envelope, spool_name, created_ms) VALUES (?, ?, ?, ?, ?)",
                (seq, kind, envelope, spool_name, now_ms),
            )
        self._pending_bytes += len(envelope)
        return seq

    def enqueue_many(
        self, items: list[tuple[str, Callable[[int], bytes], str | None]], now_ms: int
    ) -> list[tuple[str | None, int]]:
        """`enqueue` for a batch in one commit (one fsync); stops early at the disk bound.

        Returns `(spool_name, seq)` of the items taken, in order; raises OutboxFullError only if none fit.
        """
        taken: list[tuple[str | None, int]] = []
        added = 0
        with self._txn() as db:
            seq = int(db.execute("SELECT value FROM meta WHERE name = 'next_seq'").fetchone()[0])
            for kind, sign, spool_name in items:
                envelope = sign(seq)
                if self._pending_bytes + added + len(envelope) > self.max_bytes:
                    break
                db.execute(
                    "INSERT INTO outbox (seq, kind, envelope, spool_name, created_ms) VALUES (?, ?, ?, ?, ?)",
                    (seq, kind, envelope, spool_name, now_ms),
                )
                taken.append((spool_name, seq))
                added += len(envelope)
                seq += 1
            db.execute("UPDATE meta SET value = ? WHERE name = 'next_seq'", (seq,))
        self._pending_bytes += added
        if items and not taken:
            raise OutboxFullError(f"outbox holds {self._pending_bytes} bytes, bound {self.max_bytes}")
        return taken

    def next_ephemeral_seq(self) -> int:
        """A seq for a message that is not kept (heartbeat): still from the same persisted counter."""
        with self._txn() as db:
            seq = int(db.execute("SELECT value FROM meta WHERE name = 'next_seq'").fetchone()[0])
            db.execute("UPDATE meta SET value = ? WHERE name = 'next_seq'", (seq + 1,))
        return seq

    def due(self, now_ms: int, limit: int) -> list[PendingReport]:
        rows = self._db.execute(
            "SELECT seq, kind, envelope, attempts FROM outbox WHERE next_send_ms <= ? ORDER BY seq LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        return [PendingReport(*row) for row in rows]

    def mark_sent(self, seqs: list[int], next_send_ms: list[int]) -> None:
        with self._txn() as db:
            db.executemany(
                "UPDATE outbox SET attempts = attempts + 1, next_send_ms = ? WHERE seq = ?",
                list(zip(next_send_ms, seqs, strict=True)),
            )

    def resend_all_now(self) -> None:
        """After a reconnect everything unreceipted is due again (the broker may have lost it)."""
        with self._txn() as db:
            db.execute("UPDATE outbox SET next_send_ms = 0")

    def pending(self, seq: int) -> PendingReport | None:
        row = self._db.execute("SELECT seq, kind, envelope, attempts FROM outbox WHERE seq = ?", (seq,)).fetchone()
        return PendingReport(*row) if row else None

    def settle(self, receipts: list[SettledReport], now_ms: int) -> int:
        """Move receipted reports out of the outbox into `receipts`, kept with their proofs; returns how many moved."""
        moved = 0
        freed = 0
        with self._txn() as db:
            for receipt in receipts:
                row = db.execute(
                    "SELECT kind, envelope, spool_name FROM outbox WHERE seq = ?", (receipt.seq,)
                ).fetchone()
                if row is None:
                    continue
                db.execute("DELETE FROM outbox WHERE seq = ?", (receipt.seq,))
                self._keep(db, receipt, row[0], bytes(row[1]), row[2], now_ms)
                moved += 1
                freed += len(row[1])
        self._pending_bytes -= freed
        return moved

    def keep_receipt(self, receipt: SettledReport, kind: str, envelope: bytes, now_ms: int) -> None:
        """Keep a receipted message that never was in the outbox (the enrolment request and its grant's receipt)."""
        with self._txn() as db:
            self._keep(db, receipt, kind, envelope, None, now_ms)

    @staticmethod
    def _keep(
        db: sqlite3.Connection, receipt: SettledReport, kind: str, envelope: bytes, spool_name: str | None, now_ms: int
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO receipts (seq, leaf_index, tree_size, envelope_sha256, spool_name, received_ms,"
            " kind, envelope, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                receipt.seq,
                receipt.leaf_index,
                receipt.tree_size,
                receipt.envelope_sha256,
                spool_name,
                now_ms,
                kind,
                envelope,
                b"".join(receipt.path),
            ),
        )
        if receipt.checkpoint:
            db.execute("INSERT OR IGNORE INTO checkpoints VALUES (?, ?)", (receipt.tree_size, receipt.checkpoint))

    def kept_receipts(self) -> list[KeptReceipt]:
        """Every receipted report, by seq, with its envelope and proof where kept."""
        rows = self._db.execute(
            "SELECT r.seq, r.kind, r.envelope, r.envelope_sha256, r.leaf_index, r.tree_size, r.path, c.note,"
            " r.received_ms FROM receipts r LEFT JOIN checkpoints c ON c.size = r.tree_size ORDER BY r.seq"
        ).fetchall()
        return [
            KeptReceipt(
                seq=int(seq),
                kind=kind,
                envelope=None if envelope is None else bytes(envelope),
                envelope_sha256=digest,
                leaf_index=int(index),
                tree_size=int(size),
                path=None if path is None else tuple(bytes(path[i : i + _HASH]) for i in range(0, len(path), _HASH)),
                checkpoint=None if note is None else bytes(note),
                received_ms=int(received_ms),
            )
            for seq, kind, envelope, digest, index, size, path, note, received_ms in rows
        ]

    def refuse(self, seq: int, envelope_sha256: str, reason: str, detail: str, now_ms: int) -> bool:
        """Move a pending report the MID refused out of the outbox, kept with the reason; True when it moved.

        Only the report whose exact envelope hashes to `envelope_sha256` moves, so a notice can settle nothing else.
        """
        with self._txn() as db:
            row = db.execute("SELECT kind, envelope, spool_name FROM outbox WHERE seq = ?", (seq,)).fetchone()
            if row is None or envelope_digest(bytes(row[1])).hex() != envelope_sha256:
                return False
            db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            db.execute(
                "INSERT OR REPLACE INTO refused VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, row[0], row[1], envelope_sha256, row[2], reason, detail, now_ms),
            )
        self._pending_bytes -= len(row[1])
        return True

    def refused(self) -> list[RefusedReport]:
        rows = self._db.execute("SELECT seq, kind, envelope, reason, detail, refused_ms FROM refused ORDER BY seq")
        return [RefusedReport(int(r[0]), r[1], bytes(r[2]), r[3], r[4], int(r[5])) for r in rows]

    def get_meta(self, name: str) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def set_meta(self, name: str, value: bytes) -> None:
        with self._txn() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def usage(self) -> OutboxUsage:
        pending = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        receipted = int(self._db.execute("SELECT COUNT(*) FROM receipts WHERE kind IS NOT 'enrol'").fetchone()[0])
        refused = int(self._db.execute("SELECT COUNT(*) FROM refused").fetchone()[0])
        return OutboxUsage(pending, self._pending_bytes, receipted, refused)

    def receipt_of(self, spool_name: str) -> tuple[int, int] | None:
        """(seq, leaf index) of the verified receipt of the message named `spool_name`, or None while it has none."""
        row = self._db.execute("SELECT seq, leaf_index FROM receipts WHERE spool_name = ?", (spool_name,)).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def receipted_seqs(self) -> list[int]:
        return [int(r[0]) for r in self._db.execute("SELECT seq FROM receipts ORDER BY seq")]
