"""The buyer market's durable state, one SQLite file (WAL, synchronous=FULL: it holds who may pay and what was paid).

- `buyers`: the buyers the operator registered (`midgate coordinator buyer add|revoke`), each with its Ed25519 key.
  `serve` reads this table on every request, so an addition or revocation by the CLI (another process, another
  connection) holds from the next request on, without a restart.
- `request_marks`: per buyer, a time at or after the `issued_ms` of every request of that buyer ever accepted. The
  nonces themselves live in memory only (a poll writes nothing, bench/market_api_bench.py): a statement is refused
  `replayed` when its nonce is in memory, and when its `issued_ms` is at or before the buyer's mark as the store found
  it when it opened (those statements may have been used before a restart, their nonces lost with the memory).
  The mark is moved forward, durably, before a request signed after it is accepted, in steps of MARK_STEP_MS so a
  buyer polling every second writes one row every few seconds. So a replay is refused after a restart too, whatever
  the server's clock did meanwhile; a request signed before the restart but not sent until after it is refused as
  well (the client signs it again), and a buyer's mark holds only that buyer's requests back.
- `jobs`: one row per buyer job, its state and everything the API shows of it (coordinator/market/desk.py).

Blocking: async callers use asyncio.to_thread. One connection, one lock: every call is a short transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.sqlite_files import immediate_transaction, open_wal
from protocol.buyer_request import MAX_SKEW_MS
from protocol.errors import BadKeyError, PolicyViolationError, ReplayedError
from protocol.identity import VerifierKey

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buyers (
    name TEXT PRIMARY KEY,
    key_text TEXT NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    added_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS request_marks (
    buyer TEXT PRIMARY KEY,
    mark_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    buyer TEXT NOT NULL,
    idempotency_key TEXT,
    request_sha256 TEXT NOT NULL,
    doc TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    UNIQUE (buyer, idempotency_key)
);
CREATE INDEX IF NOT EXISTS jobs_by_buyer ON jobs (buyer, created_ms);
"""


@dataclass(frozen=True)
class Buyer:
    name: str
    key: VerifierKey
    added_ms: int
    revoked_ms: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None


MARK_STEP_MS = 10_000
"""How far past a request's `issued_ms` a buyer's request mark is moved (one durable write per step per buyer)."""


class MarketStore:
    """Buyers, request nonces and buyer jobs (module docstring)."""

    def __init__(self, path: Path) -> None:
        self._db = open_wal(path, "FULL", _SCHEMA)
        self._lock = threading.Lock()
        self._nonce_lock = threading.Lock()
        self._nonces: dict[tuple[str, str], int] = {}  # (buyer, nonce) -> issued_ms, within the signature window
        self._pruned_ms = 0
        with self._write() as db:
            _carry_old_nonces(db)
            self._floors: dict[str, int] = {str(b): int(m) for b, m in db.execute("SELECT * FROM request_marks")}
        self._marks = dict(self._floors)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate_transaction(self._db) as db:
            yield db

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # Buyers

    def add_buyer(self, name: str, key: VerifierKey, now_ms: int) -> Buyer:
        """Register `name` with `key`. A name or key registered before (revoked or not) is refused: a revoked buyer
        comes back under a new key and name, so no old signature ever becomes valid again."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM buyers WHERE name=?", (name,)).fetchone():
                raise PolicyViolationError("a buyer with this name is registered already", buyer=name)
            if db.execute("SELECT 1 FROM buyers WHERE key_id=?", (key.key_id.hex(),)).fetchone():
                raise BadKeyError("this key is registered already (for another buyer)", key_id=key.key_id.hex())
            db.execute("INSERT INTO buyers VALUES (?, ?, ?, ?, NULL)", (name, key.text(), key.key_id.hex(), now_ms))
        return Buyer(name, key, now_ms, None)

    def revoke_buyer(self, name: str, now_ms: int) -> Buyer:
        with self._write() as db:
            if not db.execute("SELECT 1 FROM buyers WHERE name=?", (name,)).fetchone():
                raise PolicyViolationError("no such buyer", buyer=name)
            db.execute("UPDATE buyers SET revoked_ms=COALESCE(revoked_ms, ?) WHERE name=?", (now_ms, name))
        found = self.buyer(name)
        assert found is not None
        return found

    def buyer(self, name: str) -> Buyer | None:
        rows = self._rows("SELECT name, key_text, added_ms, revoked_ms FROM buyers WHERE name=?", (name,))
        return _buyer(rows[0]) if rows else None

    def buyer_by_key_id(self, key_id_hex: str) -> Buyer | None:
        rows = self._rows("SELECT name, key_text, added_ms, revoked_ms FROM buyers WHERE key_id=?", (key_id_hex,))
        return _buyer(rows[0]) if rows else None

    def buyers(self) -> list[Buyer]:
        return [_buyer(r) for r in self._rows("SELECT name, key_text, added_ms, revoked_ms FROM buyers ORDER BY name")]

    # Nonces

    def use_nonce(self, buyer: str, nonce: str, issued_ms: int, now_ms: int) -> None:
        """Remember a request nonce; ReplayedError when this buyer used it before (within the signature window, or
        possibly before the store was opened: module docstring). The caller refused statements outside the window."""
        with self._nonce_lock:
            floor = self._floors.get(buyer, -1)
            if issued_ms <= floor:
                raise ReplayedError(
                    "signed before the coordinator restarted (it may have been used then): sign it again with"
                    f" issued_ms after {floor}",
                    buyer=buyer,
                    issued_ms=issued_ms,
                )
            if (buyer, nonce) in self._nonces:
                raise ReplayedError("this request nonce was used before", buyer=buyer, nonce=nonce)
            if issued_ms > self._marks.get(buyer, -1):
                mark = issued_ms + MARK_STEP_MS
                with self._write() as db:  # durable before the request is acted on
                    db.execute("INSERT OR REPLACE INTO request_marks VALUES (?, ?)", (buyer, mark))
                self._marks[buyer] = mark
            self._nonces[(buyer, nonce)] = issued_ms
            if now_ms - self._pruned_ms > MAX_SKEW_MS:  # a statement older than the window is refused stale anyway
                oldest = now_ms - 2 * MAX_SKEW_MS
                self._nonces = {k: t for k, t in self._nonces.items() if t >= oldest}
                self._pruned_ms = now_ms

    # Jobs

    def insert_job(
        self, job_id: str, buyer: str, idempotency_key: str | None, request_sha256: str, doc: str, now_ms: int
    ) -> tuple[str, str, str] | None:
        """Insert a requested job; when the buyer used `idempotency_key` before, insert nothing and return that job's
        (job id, request hash, doc)."""
        with self._write() as db:
            if idempotency_key is not None:
                row = db.execute(
                    "SELECT job_id, request_sha256, doc FROM jobs WHERE buyer=? AND idempotency_key=?",
                    (buyer, idempotency_key),
                ).fetchone()
                if row is not None:
                    return str(row[0]), str(row[1]), str(row[2])
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, 'requested', ?, ?)",
                (job_id, buyer, idempotency_key, request_sha256, doc, now_ms, now_ms),
            )
        return None

    def job_doc(self, job_id: str) -> tuple[str, str] | None:
        """(buyer, doc) of a job."""
        rows = self._rows("SELECT buyer, doc FROM jobs WHERE job_id=?", (job_id,))
        return (str(rows[0][0]), str(rows[0][1])) if rows else None

    def update_job(self, job_id: str, state: str, doc: str, now_ms: int, expected_doc: str | None = None) -> bool:
        """Write a job's new state; with `expected_doc`, only if the job is still as read (False otherwise)."""
        with self._write() as db:
            if expected_doc is not None:
                row = db.execute("SELECT doc FROM jobs WHERE job_id=?", (job_id,)).fetchone()
                if row is None or row[0] != expected_doc:
                    return False
            db.execute("UPDATE jobs SET state=?, doc=?, updated_ms=? WHERE job_id=?", (state, doc, now_ms, job_id))
        return True

    def job_ids(self, buyer: str | None = None, states: tuple[str, ...] = ()) -> list[str]:
        sql, args = "SELECT job_id FROM jobs WHERE 1=1", []
        if buyer is not None:
            sql, args = sql + " AND buyer=?", [buyer]
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += list(states)
        return [str(r[0]) for r in self._rows(sql + " ORDER BY created_ms, job_id", tuple(args))]


def _carry_old_nonces(db: sqlite3.Connection) -> None:
    """A store written before `request_marks` kept its nonces in a `nonces` table: each buyer's mark becomes the last
    `issued_ms` there, so none of them is accepted again; then the table goes."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='nonces'").fetchone():
        db.execute(
            "INSERT OR REPLACE INTO request_marks SELECT buyer, MAX(mark, issued) FROM (SELECT n.buyer AS buyer,"
            " MAX(n.issued_ms) AS issued, COALESCE(m.mark_ms, 0) AS mark FROM nonces n"
            " LEFT JOIN request_marks m ON m.buyer = n.buyer GROUP BY n.buyer)"
        )
        db.execute("DROP TABLE nonces")


def _buyer(row: tuple[Any, ...]) -> Buyer:
    return Buyer(str(row[0]), VerifierKey.parse(str(row[1])), int(row[2]), None if row[3] is None else int(row[3]))
