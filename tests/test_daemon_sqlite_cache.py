"""The SQLite files the agent daemon keeps open hold at most 512 KiB of pages each (edge/sqlite_cache.py): with
SQLite's default a connection that once read its whole table keeps 2 MiB resident for the daemon's lifetime."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge.agent.outbox import Outbox
from edge.sensors.store import SampleStore
from edge.sqlite_cache import DAEMON_CACHE_KIB


def _cache_kib(db: sqlite3.Connection) -> int:
    return -int(db.execute("PRAGMA cache_size").fetchone()[0])


def test_the_outbox_and_the_sample_store_bound_their_page_cache(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite", 1 << 20)
    store = SampleStore(tmp_path / "samples.db")
    try:
        assert _cache_kib(outbox._db) == _cache_kib(store._db) == DAEMON_CACHE_KIB == 512
    finally:
        outbox.close()
        store.close()
    fresh = sqlite3.connect(tmp_path / "outbox.sqlite")
    assert _cache_kib(fresh) == 2000  # SQLite's default, which the daemon's connections do not keep
    fresh.close()
