"""Where in the MID's log a manifest's leaves are: each JOB leaf by job id, each SETTLEMENT leaf by record id, each
CONTRIBUTION leaf by Flower run id. A manifest build looked these up by reading the whole log, three times per
manifest; the index reads each leaf once, ever, and a build then reads only the leaves it cites.

The index is derived from the log alone (append-only, so the leaves past `scanned_to` are all it has not seen) and
Flower run ids are unsigned 64-bit, beyond SQLite's INTEGER: they are kept as text. The index is
rebuilt from scratch when it does not match the log it is given (another origin, or a log shorter than it scanned).
It is a cache: losing it costs one scan, so it is written with synchronous=NORMAL. `serve` and `coordinator job
manifest` may both update it; each update is one transaction. Blocking.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.ledger.store import LedgerReader
from coordinator.royalties.settlement import decode_record
from coordinator.sqlite_files import immediate_transaction, open_wal
from protocol.job_log import decode_job_record
from protocol.leaves import LeafKind, decode_leaf
from protocol.provenance import contribution_run_id

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (job_id, idx));
CREATE TABLE IF NOT EXISTS settlements (record_id TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (record_id, idx));
CREATE TABLE IF NOT EXISTS contributions (run_id TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (run_id, idx));
"""


class LogIndex:
    """The leaves a manifest cites, by what names them (module docstring)."""

    def __init__(self, path: Path) -> None:
        self._db = open_wal(path, "NORMAL", _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def update(self, reader: LedgerReader) -> None:
        """Index the leaves of `reader`'s log this index has not seen yet."""
        with immediate_transaction(self._db) as db:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            scanned = int(meta.get("scanned_to", 0))
            if meta.get("origin", reader.origin) != reader.origin or scanned > reader.size:
                for table in ("jobs", "settlements", "contributions"):
                    db.execute(f"DELETE FROM {table}")
                scanned = 0
            for index, data in reader.leaves(scanned, reader.size):
                leaf = decode_leaf(data)
                if leaf.kind is LeafKind.JOB:
                    db.execute(
                        "INSERT OR IGNORE INTO jobs VALUES (?, ?)", (decode_job_record(leaf.signed).job_id, index)
                    )
                elif leaf.kind is LeafKind.SETTLEMENT:
                    record_id = decode_record(leaf.signed).inputs.record_id
                    db.execute("INSERT OR IGNORE INTO settlements VALUES (?, ?)", (record_id, index))
                else:
                    run_id = contribution_run_id(leaf)
                    if run_id is not None:
                        db.execute("INSERT OR IGNORE INTO contributions VALUES (?, ?)", (str(run_id), index))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('origin', ?)", (reader.origin,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('scanned_to', ?)", (str(reader.size),))

    def first_job(self, job_id: str) -> int | None:
        """The index of the job's first JOB leaf."""
        row = self._db.execute("SELECT MIN(idx) FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def settlement_after(self, record_id: str, after: int) -> int | None:
        """The index of the first SETTLEMENT leaf of `record_id` after index `after`."""
        row = self._db.execute(
            "SELECT MIN(idx) FROM settlements WHERE record_id=? AND idx > ?", (record_id, after)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def contributions(self, run_id: int, before_index: int) -> list[int]:
        """The indices, in log order, of the CONTRIBUTION leaves naming `run_id` below `before_index`."""
        rows = self._db.execute(
            "SELECT idx FROM contributions WHERE run_id=? AND idx < ? ORDER BY idx", (str(run_id), before_index)
        ).fetchall()
        return [int(r[0]) for r in rows]
