"""The MID's transparency log on SQLite: durable batched appends, signed checkpoints, proofs and receipts.

One writer (the coordinator). Each `append` is one transaction holding the batch's leaves (exact bytes and leaf
hashes), every interior node the batch completes, and the checkpoint signed over the new root; SQLite in WAL mode
with `synchronous=FULL` makes the commit durable before `append` returns, so a process killed at any point reopens
to the state after the last acknowledged batch. Appending keeps a compact range in memory (no rehashing of the
tree); a proof reads O(log n) stored hashes.

Schema (format 1):
    leaves(idx INTEGER PRIMARY KEY, data BLOB)            -- exact leaf bytes
    batches(end INTEGER PRIMARY KEY, start INTEGER, hashes BLOB)
    checkpoints(size INTEGER PRIMARY KEY, note BLOB, issued_ms INTEGER)
    meta(key TEXT PRIMARY KEY, value TEXT)                -- origin, format

`batches.hashes` holds, for the batch of leaves [start, end), every tree hash the batch completed, level by level
(leaf hashes, then level 1, ...; see `tree.batch_offset`): one row per batch instead of two rows per leaf, which is
what keeps durable appends close to plain inserts (measured in bench/ledger_bench.py). A node's hash lives in the
batch that holds the node's last leaf.

`LedgerStore` is synchronous and thread-safe (one lock); event-loop code hands each call to a worker thread
(`asyncio.to_thread`), so SQLite fsyncs and signing never block the loop.
"""

from __future__ import annotations

import bisect
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from types import TracebackType
from typing import Self

from coordinator.ledger.tree import (
    CompactRange,
    NodeId,
    batch_offset,
    consistency_spans,
    hashes_for_spans,
    inclusion_spans,
    last_leaf,
)
from protocol.checkpoint import Checkpoint, Receipt, open_checkpoint, parse_checkpoint_text, sign_checkpoint
from protocol.errors import BadProofError, InconsistentError, MalformedError, TooLargeError
from protocol.identity import SignerKey, VerifierKey
from protocol.leaves import MAX_SIGNED_SIZE, Leaf
from protocol.merkle import EMPTY_ROOT, HASH_SIZE
from protocol.note import NoteSignature, add_signatures, parse_note
from protocol.witness import CosignatureVerifier, verify_cosignature

FORMAT = "1"
MAX_LEAF_SIZE = MAX_SIGNED_SIZE + 6
MAX_BATCH = 100_000
# Subtrees of 2^10 leaves and up are cached in memory once read or appended: about 2n/1024 hashes for n leaves.
UPPER_LEVEL = 10
LEAF_CHUNK = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leaves(idx INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches("end" INTEGER PRIMARY KEY, start INTEGER NOT NULL, hashes BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints(size INTEGER PRIMARY KEY, note BLOB NOT NULL, issued_ms INTEGER NOT NULL);
"""


def _group_by_batch(
    ids: Sequence[NodeId], starts: Sequence[int], ends: Sequence[int]
) -> dict[tuple[int, int], list[NodeId]]:
    """Nodes grouped by the batch (start, end) that stores them: the batch holding each node's last leaf."""
    groups: dict[tuple[int, int], list[NodeId]] = {}
    for level, index in ids:
        leaf = last_leaf(level, index)
        position = bisect.bisect_right(ends, leaf)
        if position == len(ends) or starts[position] > leaf:
            raise InconsistentError("ledger has no stored batch for a tree node", level=level, index=index)
        groups.setdefault((starts[position], ends[position]), []).append((level, index))
    return groups


def _read_origin(conn: sqlite3.Connection) -> str:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as exc:
        raise MalformedError("not a ledger database", error=str(exc)) from exc
    if meta.get("format") != FORMAT or not meta.get("origin"):
        raise MalformedError("unknown ledger format", expected=FORMAT, found=meta.get("format"))
    return str(meta["origin"])


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the ledger's durability settings: WAL and fsync on every commit."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@dataclass(frozen=True)
class AppendResult:
    """Where a batch landed: leaves [first_index, first_index + count), and the checkpoint issued after it."""

    first_index: int
    count: int
    checkpoint: bytes

    @property
    def indices(self) -> range:
        return range(self.first_index, self.first_index + self.count)

    @property
    def size(self) -> int:
        return self.first_index + self.count


class LedgerReader:
    """Read access to a ledger file without its signing key: entries, checkpoints, proofs, receipts (CLI, audits)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, origin: str) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.origin = origin
        # Batch boundaries (ascending ends, with their starts) and the hashes of high subtrees are kept in memory:
        # a proof then costs one blob read per distinct low-level batch instead of one query per node (measured in
        # bench/ledger_bench.py: ~1.5 ms -> well under 1 ms at 1M leaves). Both are append-only, like the file.
        self._ends: list[int] = []
        self._starts: list[int] = []
        self._upper: dict[NodeId, bytes] = {}
        # One read transaction: the batch list and the size must come from one snapshot of the file. Read apart, an
        # append by the writer (`serve`) in between gave a size whose nodes no batch in the list stored (seen by
        # `job start` polling the ledger while serve logged a member's leave and its key revocation).
        conn.execute("BEGIN")
        try:
            for start, end in conn.execute('SELECT start, "end" FROM batches ORDER BY "end"'):
                self._starts.append(int(start))
                self._ends.append(int(end))
            self._range = self._load_range()
        finally:
            conn.execute("COMMIT")

    @classmethod
    def open_existing(cls, path: Path) -> LedgerReader:
        """Open an existing ledger for reading; raises MalformedError if `path` is not a ledger of this format."""
        if not path.is_file():
            raise MalformedError("no ledger file at this path", path=str(path))
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            origin = _read_origin(conn)
            return cls(conn, path, origin)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def size(self) -> int:
        return self._range.size

    def root(self) -> bytes:
        return self._range.root()

    def root_at(self, size: int) -> bytes:
        """The tree root at an earlier `size` (<= current), from O(log n) stored hashes."""
        if not 0 <= size <= self.size:
            raise BadProofError("size beyond the log", size=size, log_size=self.size)
        return hashes_for_spans([(0, size)], self._read_nodes)[0] if size else EMPTY_ROOT

    def checkpoint(self, size: int | None = None) -> bytes:
        """The signed checkpoint note at `size` (default: the latest), with any attached cosignatures."""
        with self._lock:
            if size is None:
                row = self._conn.execute("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
                if row is None:
                    return self._empty_checkpoint()
            else:
                row = self._conn.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
                if row is None:
                    if size == 0:
                        return self._empty_checkpoint()
                    raise BadProofError("no checkpoint was issued at this size", size=size)
            return bytes(row[0])

    def _empty_checkpoint(self) -> bytes:
        raise BadProofError("the log is empty: no checkpoint was issued yet", size=0)

    def checkpoint_sizes(self) -> list[int]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT size FROM checkpoints ORDER BY size")]

    def checkpoint_history(self) -> list[tuple[int, int]]:
        """(size, issued_ms) of every checkpoint issued, oldest first: how the log grew."""
        with self._lock:
            rows = self._conn.execute("SELECT size, issued_ms FROM checkpoints ORDER BY size").fetchall()
        return [(int(size), int(issued)) for size, issued in rows]

    def leaf(self, index: int) -> bytes:
        """The exact bytes of the leaf at `index`."""
        with self._lock:
            row = self._conn.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()
        if row is None:
            raise BadProofError("no leaf at this index", index=index, size=self.size)
        return bytes(row[0])

    def leaves(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(index, bytes) of leaves in [start, end), read in chunks so a long range never sits in memory at once."""
        while start < end:
            with self._lock:
                rows = self._conn.execute(
                    "SELECT idx, data FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx LIMIT ?",
                    (start, end, LEAF_CHUNK),
                ).fetchall()
            if not rows:
                return
            for idx, data in rows:
                yield int(idx), bytes(data)
            start = int(rows[-1][0]) + 1

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion path for leaf `index` in the tree of `size` (default: current). Requires index < size."""
        size = self.size if size is None else size
        if not 0 <= index < size <= self.size:
            raise BadProofError("need 0 <= index < size <= log size", index=index, size=size, log_size=self.size)
        return hashes_for_spans(inclusion_spans(index, size), self._read_nodes)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof from `size1` to `size2` (default: current); empty from size 0 (C2SP)."""
        size2 = self.size if size2 is None else size2
        if not 0 <= size1 <= size2 <= self.size:
            raise BadProofError("need 0 <= size1 <= size2 <= log size", size1=size1, size2=size2, log_size=self.size)
        return hashes_for_spans(consistency_spans(size1, size2), self._read_nodes)

    def receipt(self, index: int, size: int | None = None) -> str:
        """A c2sp.org/tlog-proof for leaf `index` against the stored checkpoint at `size` (default: latest)."""
        note = self.checkpoint(size)
        checkpoint = parse_checkpoint_text(parse_note(note).text)
        proof = self.inclusion_proof(index, checkpoint.size)
        return Receipt(index, tuple(proof), note).text()

    def _read_nodes(self, ids: Sequence[NodeId]) -> Mapping[NodeId, bytes]:
        """Hashes of perfect subtrees, from the batch rows holding them (one read per distinct batch)."""
        found: dict[NodeId, bytes] = {}
        wanted: list[NodeId] = []
        for nid in ids:
            cached = self._upper.get(nid)
            if cached is None:
                wanted.append(nid)
            else:
                found[nid] = cached
        with self._lock:
            for (start, end), nodes in _group_by_batch(wanted, self._starts, self._ends).items():
                with self._conn.blobopen("batches", "hashes", end, readonly=True) as blob:
                    for level, index in nodes:
                        blob.seek(batch_offset(start, end, level, index) * HASH_SIZE)
                        value = blob.read(HASH_SIZE)
                        if len(value) != HASH_SIZE:
                            raise InconsistentError("stored batch hashes are truncated", level=level, index=index)
                        found[(level, index)] = value
                        if level >= UPPER_LEVEL:
                            self._upper[(level, index)] = value
        return found

    def _load_range(self) -> CompactRange:
        row = self._conn.execute('SELECT max("end") - 1 FROM batches').fetchone()
        size = 0 if row[0] is None else int(row[0]) + 1
        ids = CompactRange.border_ids(size)
        stored = self._read_nodes(ids) if ids else {}
        return CompactRange(size, [stored[nid] for nid in ids])


class LedgerStore(LedgerReader):
    """The log's single writer. Open with `LedgerStore.open(path, log_key)`; close with `close()` or `with`."""

    def __init__(self, conn: sqlite3.Connection, log_key: SignerKey, path: Path) -> None:
        super().__init__(conn, path, log_key.name)
        self._key = log_key

    @classmethod
    def open(cls, path: Path, log_key: SignerKey) -> LedgerStore:
        """Open (creating if needed) the ledger at `path`, signed by `log_key` whose name is the log's origin.

        Checks that the stored tree's root matches the latest stored checkpoint; raises InconsistentError if not.
        """
        conn = connect(path)
        try:
            conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
            if conn.execute("SELECT count(*) FROM meta").fetchone()[0] == 0:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)", [("origin", log_key.name), ("format", FORMAT)]
                )
                conn.execute("COMMIT")
            origin = _read_origin(conn)
            if origin != log_key.name:
                raise MalformedError("ledger belongs to another log", expected=log_key.name, found=origin)
            store = cls(conn, log_key, path)
            store._check_latest_checkpoint()
        except BaseException:
            conn.close()
            raise
        return store

    @property
    def verifier(self) -> VerifierKey:
        """The log's public key: what members pin to verify checkpoints and receipts."""
        return self._key.verifier

    def append(self, leaves: Sequence[bytes]) -> AppendResult:
        """Append a batch of leaves (exact bytes) in one durable transaction and issue a checkpoint over it.

        Returns after the commit is on disk. On any failure nothing is written and the log is unchanged.
        """
        if not leaves:
            raise MalformedError("a batch needs at least one leaf")
        if len(leaves) > MAX_BATCH:
            raise TooLargeError("batch too large", limit=MAX_BATCH, found=len(leaves))
        for position, data in enumerate(leaves):
            if len(data) > MAX_LEAF_SIZE:
                raise TooLargeError("leaf too large", position=position, limit=MAX_LEAF_SIZE, found=len(data))
        with self._lock:
            grown = self._range.copy()
            first = grown.size
            hash_leaf = hashlib.sha256
            levels = grown.extend([hash_leaf(b"\x00" + data).digest() for data in leaves])
            note = sign_checkpoint(Checkpoint(self.origin, grown.size, grown.root()), self._key)
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                # One writer per file: a second LedgerStore on the same file would extend a stale tree.
                stored_size = conn.execute('SELECT coalesce(max("end"), 0) FROM batches').fetchone()[0]
                if stored_size != first:
                    raise InconsistentError("another writer appended to this ledger", expected=first, found=stored_size)
                conn.executemany(
                    "INSERT INTO leaves(idx, data) VALUES (?, ?)", zip(range(first, grown.size), leaves, strict=True)
                )
                conn.execute(
                    'INSERT INTO batches("end", start, hashes) VALUES (?, ?, ?)',
                    (grown.size, first, b"".join(chain.from_iterable(levels))),
                )
                conn.execute(
                    "INSERT INTO checkpoints(size, note, issued_ms) VALUES (?, ?, ?)",
                    (grown.size, note, time.time_ns() // 1_000_000),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._range = grown
            self._starts.append(first)
            self._ends.append(grown.size)
            for level in range(UPPER_LEVEL, len(levels)):
                low = first >> level
                for offset, value in enumerate(levels[level]):
                    self._upper[(level, low + offset)] = value
            return AppendResult(first, len(leaves), note)

    def append_leaves(self, leaves: Sequence[Leaf]) -> AppendResult:
        """Append typed leaves (see protocol.leaves)."""
        return self.append([leaf.encode() for leaf in leaves])

    def attach_cosignatures(
        self, size: int, cosignatures: Sequence[NoteSignature], witnesses: Sequence[CosignatureVerifier]
    ) -> bytes:
        """Verify member cosignatures over the checkpoint at `size` and store them with it; returns the new note.

        Each cosignature must come from one of `witnesses` and verify over this exact checkpoint, or nothing is
        stored (BadSignatureError / UnknownKeyError).
        """
        note = self.checkpoint(size)
        text = parse_note(note).text
        for cosignature in cosignatures:
            verify_cosignature(text, cosignature, witnesses)
        updated = add_signatures(note, cosignatures)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (updated, size))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return updated

    def _empty_checkpoint(self) -> bytes:
        return sign_checkpoint(Checkpoint(self.origin, 0, CompactRange().root()), self._key)

    def _check_latest_checkpoint(self) -> None:
        row = self._conn.execute("SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
        latest_size, note = (0, None) if row is None else (int(row[0]), bytes(row[1]))
        if latest_size != self.size:
            raise InconsistentError(
                "latest checkpoint size differs from the log size", expected=self.size, found=latest_size
            )
        if note is not None:
            checkpoint = open_checkpoint(note, self._key.verifier).checkpoint
            if checkpoint.root != self.root():
                raise InconsistentError("stored tree does not match the latest checkpoint", size=self.size)
