"""The page cache of the SQLite files the agent daemon keeps open for its lifetime (each membership's outbox, the
sample store it writes).

SQLite keeps up to 2,000 KiB of pages per connection by default and gives none back: a daemon that once scanned its
receipts or its samples keeps 2 MiB per connection resident for good, against an idle budget of 50 MB RSS on a
Raspberry Pi hub (BENCHMARKS.md, "Raspberry Pi hub"). 512 KiB still holds the right-hand pages of every table and
index an append touches, and the kernel's page cache holds the file beside it.
"""

from __future__ import annotations

import sqlite3

DAEMON_CACHE_KIB = 512


def bound_page_cache(db: sqlite3.Connection) -> None:
    db.execute(f"PRAGMA cache_size=-{DAEMON_CACHE_KIB}")
