"""The one way ingest's own SQLite files are opened and written: WAL, autocommit off by hand, IMMEDIATE transactions.

Each caller names its `synchronous` level and why (FULL where a broker ack follows the commit; NORMAL where the
file is rebuilt from the ledger after a power loss).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from protocol.private_files import private_file


def open_wal(path: Path, synchronous: Literal["FULL", "NORMAL"], schema: str) -> sqlite3.Connection:
    """Open (creating folders 0700, the file 0600 and tables as needed) `path` in WAL mode, usable from the one thread
    that writes it."""
    db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.executescript(schema)
    return db


@contextmanager
def immediate_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
