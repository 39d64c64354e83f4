"""Full audit of a ledger file: re-derive every hash and check every signed checkpoint, naming the first bad place.

The audit trusts nothing in the file but the log's public key (and, optionally, checkpoints a member kept): it
rehashes every leaf from its stored bytes, rebuilds every tree node, compares them with the stored batch hashes,
and checks that each stored checkpoint is signed by the log and has the root of the tree at its size. It reads the
file directly (not through `LedgerStore`), so a damaged file is reported, not "repaired" by the reader.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from coordinator.ledger.store import FORMAT
from coordinator.ledger.tree import CompactRange, batch_offset
from protocol.checkpoint import Checkpoint, open_checkpoint
from protocol.errors import InconsistentError, ProtocolError
from protocol.identity import VerifierKey
from protocol.merkle import EMPTY_ROOT, HASH_SIZE, b64, leaf_hash


class LedgerCorruptError(InconsistentError):
    """The ledger file is not the append-only log its checkpoints sign; `place` names the first bad spot."""

    def __init__(self, message: str, place: str, **details: object) -> None:
        super().__init__(f"{place}: {message}", place=place, **details)
        self.place = place


@dataclass(frozen=True)
class AuditReport:
    size: int
    batches: int
    checkpoints: int
    trusted_checked: int


def audit_ledger(path: Path, log_vkey: VerifierKey, trusted: Sequence[bytes] = ()) -> AuditReport:
    """Re-derive and check everything in the ledger at `path`; raises LedgerCorruptError at the first bad place.

    `trusted` are checkpoint notes held outside the file (e.g. by members): the file's tree at each one's size must
    have that root, which catches a history rewritten and re-signed by the log key itself.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return _audit(conn, log_vkey, [open_checkpoint(note, log_vkey).checkpoint for note in trusted])
    except sqlite3.DatabaseError as exc:
        raise LedgerCorruptError("the file is not a readable ledger database", place="file", error=str(exc)) from exc
    finally:
        conn.close()


def _audit(conn: sqlite3.Connection, vkey: VerifierKey, trusted: list[Checkpoint]) -> AuditReport:
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT or meta.get("origin") != vkey.name:
        raise LedgerCorruptError(
            "ledger metadata does not name this log", place="meta", origin=meta.get("origin"), expected=vkey.name
        )
    signed = {int(size): bytes(note) for size, note in conn.execute("SELECT size, note FROM checkpoints")}
    pending = sorted(trusted, key=lambda cp: cp.size)
    tree = CompactRange()
    batches = 0
    leaves = _leaf_rows(conn)
    for start, end, stored in conn.execute('SELECT start, "end", hashes FROM batches ORDER BY "end"'):
        if start != tree.size or end <= start:
            raise LedgerCorruptError(
                "batch rows are not contiguous", place=f"batch ending at {end}", expected_start=tree.size, start=start
            )
        data = _take_leaves(leaves, start, end)
        hashes = [leaf_hash(d) for d in data]
        before = tree.copy()
        levels = tree.extend(hashes)
        _compare_batch(start, end, levels, bytes(stored))
        while pending and pending[0].size <= end:
            _check_trusted(pending.pop(0), before, hashes)
        _check_checkpoint(signed.pop(end, None), end, tree.root(), vkey)
        batches += 1
    extra = next(leaves, None)
    if extra is not None:
        raise LedgerCorruptError("leaf row beyond the last batch", place=f"leaf {extra[0]}", size=tree.size)
    if signed:
        size = min(signed)
        raise LedgerCorruptError("checkpoint without a matching batch", place=f"checkpoint at size {size}")
    pending = [cp for cp in pending if cp.size > 0 or cp.root != EMPTY_ROOT]
    if pending:
        raise LedgerCorruptError(
            "a trusted checkpoint is beyond the ledger: the log was truncated",
            place=f"trusted checkpoint at size {pending[0].size}",
            size=tree.size,
        )
    return AuditReport(tree.size, batches, batches, len(trusted))


def _leaf_rows(conn: sqlite3.Connection) -> Iterator[tuple[int, bytes]]:
    cursor = conn.cursor()
    cursor.arraysize = 1000
    for idx, data in cursor.execute("SELECT idx, data FROM leaves ORDER BY idx"):
        yield int(idx), bytes(data)


def _take_leaves(rows: Iterator[tuple[int, bytes]], start: int, end: int) -> list[bytes]:
    data = []
    for expected in range(start, end):
        row = next(rows, None)
        if row is None or row[0] != expected:
            found = "none" if row is None else row[0]
            raise LedgerCorruptError("leaf row missing", place=f"leaf {expected}", next_row=found)
        data.append(row[1])
    return data


def _compare_batch(start: int, end: int, levels: list[list[bytes]], stored: bytes) -> None:
    expected = b"".join(chain.from_iterable(levels))
    if stored == expected:
        return
    for level, nodes in enumerate(levels):
        for offset, value in enumerate(nodes):
            index = (start >> level) + offset
            at = batch_offset(start, end, level, index) * HASH_SIZE
            if stored[at : at + HASH_SIZE] != value:
                if level == 0:
                    raise LedgerCorruptError(
                        "leaf bytes do not match the leaf hash recorded when it was appended", place=f"leaf {index}"
                    )
                first, last = index << level, ((index + 1) << level) - 1
                raise LedgerCorruptError(
                    "stored tree node does not match the leaves under it",
                    place=f"tree node level {level} index {index} (leaves {first}..{last})",
                )
    raise LedgerCorruptError(
        "stored batch hashes have the wrong length",
        place=f"batch ending at {end}",
        expected=len(expected),
        found=len(stored),
    )


def _check_checkpoint(note: bytes | None, size: int, root: bytes, vkey: VerifierKey) -> None:
    place = f"checkpoint at size {size}"
    if note is None:
        raise LedgerCorruptError("no checkpoint stored for this batch", place=place)
    try:
        checkpoint = open_checkpoint(note, vkey).checkpoint
    except ProtocolError as exc:
        raise LedgerCorruptError(f"checkpoint does not verify ({exc.reason})", place=place) from exc
    if checkpoint.size != size:
        raise LedgerCorruptError("checkpoint names another size", place=place, found=checkpoint.size)
    if checkpoint.root != root:
        raise LedgerCorruptError(
            "signed root differs from the tree rebuilt from the stored leaves",
            place=place,
            signed=b64(checkpoint.root),
            rebuilt=b64(root),
        )


def _check_trusted(checkpoint: Checkpoint, before: CompactRange, hashes: list[bytes]) -> None:
    partial = before.copy()
    partial.extend(hashes[: checkpoint.size - before.size])
    if partial.root() != checkpoint.root:
        raise LedgerCorruptError(
            "the ledger's history differs from a checkpoint held outside the file",
            place=f"trusted checkpoint at size {checkpoint.size}",
            trusted=b64(checkpoint.root),
            rebuilt=b64(partial.root()),
        )
