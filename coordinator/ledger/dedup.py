"""Which (device key, seq) pairs are already in the ledger, and evidence of equivocation.

The ledger is the source of truth and lives in its own SQLite file, so the two cannot share a transaction. This
index therefore records how far into the ledger it has looked (`indexed_size`) and, on open, catches up by reading
the contribution leaves appended after that point: a crash between the ledger commit and the index commit costs a
re-scan of one batch, never a duplicate ledger entry.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from coordinator.sqlite_files import immediate_transaction, open_wal
from protocol.envelope import envelope_digest, peek_envelope
from protocol.errors import ProtocolError
from protocol.leaves import LeafKind, decode_leaf
from protocol.messages import U64_MAX

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('indexed_size', 0);
CREATE TABLE IF NOT EXISTS seen (
    key_id TEXT NOT NULL,
    seq TEXT NOT NULL,
    digest BLOB NOT NULL,
    leaf_index INTEGER NOT NULL,
    PRIMARY KEY (key_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS equivocations (
    id INTEGER PRIMARY KEY,
    key_id TEXT NOT NULL,
    seq TEXT NOT NULL,
    logged_leaf_index INTEGER NOT NULL,
    conflicting_envelope BLOB NOT NULL,
    received_ms INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class SeenEntry:
    digest: bytes
    leaf_index: int


class DedupIndex:
    """Synchronous; used only from the ingest worker thread."""

    def __init__(self, path: Path) -> None:
        # NORMAL, not FULL: this index is rebuilt from the ledger (catch_up) after a power loss rolls it back, and
        # skipping its fsync keeps one fsync (the ledger's) on the path from receive to receipt.
        self._db = open_wal(path, "NORMAL", _SCHEMA)
        self._highest: dict[str, int] = {}

    def close(self) -> None:
        self._db.close()

    def _txn(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._db)

    @property
    def indexed_size(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE name = 'indexed_size'").fetchone()[0])

    def lookup(self, key_id: str, seq: int) -> SeenEntry | None:
        # Agents number their reports upwards, so almost every new report is above its key's highest logged seq and
        # needs no index read (measured: the per-report SELECT was about 5 % of ingest CPU).
        highest = self._highest.get(key_id)
        if highest is None:
            highest = self._highest[key_id] = self._highest_logged(key_id)
        if seq > highest:
            return None
        row = self._db.execute("SELECT digest, leaf_index FROM seen WHERE key_id = ? AND seq = ?", (key_id, str(seq)))
        found = row.fetchone()
        return None if found is None else SeenEntry(bytes(found[0]), int(found[1]))

    def _highest_logged(self, key_id: str) -> int:
        """The key's highest indexed seq (-1: none). SQLite's CAST clamps above 2^63-1; then no seq is skipped."""
        (found,) = self._db.execute("SELECT max(CAST(seq AS INTEGER)) FROM seen WHERE key_id = ?", (key_id,)).fetchone()
        if found is None:
            return -1
        return int(found) if found < (1 << 63) - 1 else U64_MAX

    def record(self, entries: Iterable[tuple[str, int, bytes, int]], indexed_size: int) -> None:
        """Add `(key_id, seq, digest, leaf_index)` rows and move `indexed_size` forward, in one commit."""
        rows = list(entries)
        with self._txn() as db:
            db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?, ?)", [(k, str(s), d, i) for k, s, d, i in rows])
            db.execute("UPDATE meta SET value = ? WHERE name = 'indexed_size'", (indexed_size,))
        for key_id, seq, _, _ in rows:
            # Only keys already loaded: an unloaded key's highest seq is read from the index when first needed.
            highest = self._highest.get(key_id)
            if highest is not None and seq > highest:
                self._highest[key_id] = seq

    def record_equivocation(self, key_id: str, seq: int, logged_leaf_index: int, envelope: bytes, now_ms: int) -> None:
        with self._txn() as db:
            db.execute(
                "INSERT INTO equivocations (key_id, seq, logged_leaf_index, conflicting_envelope, received_ms)"
                " VALUES (?, ?, ?, ?, ?)",
                (key_id, str(seq), logged_leaf_index, envelope, now_ms),
            )

    def equivocation_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM equivocations").fetchone()[0])

    def catch_up(self, leaves: Iterable[tuple[int, bytes]], size: int) -> int:
        """Index the device-signed leaves in `leaves` (those after `indexed_size`); returns how many were added."""
        entries = []
        for index, data in leaves:
            found = signed_statement_key(data)
            if found is not None:
                key_id, seq, envelope = found
                entries.append((key_id, seq, envelope_digest(envelope), index))
        self.record(entries, size)
        return len(entries)


DEVICE_SIGNED = frozenset(
    {LeafKind.ENROL, LeafKind.CONTRIBUTION, LeafKind.STRIKE, LeafKind.LEAVE, LeafKind.KNOB, LeafKind.CONSENT}
)
"""Leaf kinds whose envelope a device key signed with a seq: its enrolment request (seq 0), reports, strike votes,
leave notices, knob updates and consent policies.
A (key, seq) names one statement across all of them (docs/protocol.md, "Replay rules")."""


def signed_statement_key(leaf_bytes: bytes) -> tuple[str, int, bytes] | None:
    """(key id, seq, envelope) of a device-signed leaf; None for the MID's own records. The ledger only holds verified
    leaves."""
    try:
        leaf = decode_leaf(leaf_bytes)
        if leaf.kind not in DEVICE_SIGNED:
            return None
        _, payload, key_ids = peek_envelope(leaf.signed)
        seq = int(json.loads(payload)["seq"])
    except (ProtocolError, ValueError, KeyError, TypeError):
        return None
    return key_ids[0], seq, leaf.signed
