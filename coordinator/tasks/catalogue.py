"""The MID's task catalogue (SQLite, 0600): every task spec the operator approved, as the envelope the MID key signed.

Devices fetch a job's spec from here (`GET /v1/tasks/{id}@{version}`, coordinator.tasks.http) and accept it only with
the MID's signature; `job start` reads a job's spec and recipe from here. The built-in specs (protocol/tasks/specs/)
are signed into the catalogue when it is first opened. A published spec never changes: adding another spec under an
existing id@version is refused (publish a new version), adding the same one again is a no-op. Each read is its own
query, so a task the operator adds with `midgate coordinator task add` is served by a running `serve` at once.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import PolicyViolationError
from protocol.identity import SignerKey
from protocol.private_files import private_file
from protocol.tasks.signed import open_task_spec, seal_task_spec
from protocol.tasks.spec import REGISTRY, TaskSpec, UnknownTaskError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    added_ms INTEGER NOT NULL,
    PRIMARY KEY (task_id, version)
);
"""


@dataclass(frozen=True)
class SignedTask:
    """A catalogue entry: the spec, the envelope the MID signed it in (what devices verify), when it was added."""

    spec: TaskSpec
    envelope: bytes
    added_ms: int


class TaskCatalogue:
    """Blocking (SQLite, signing): call from a thread on an event loop. One writer at a time (`BEGIN IMMEDIATE`)."""

    def __init__(self, path: Path, mid_key: SignerKey, now_ms: int) -> None:
        """Open or create the catalogue at `path` and sign in the built-in specs it does not hold yet."""
        self.mid_key = mid_key
        self._db = sqlite3.connect(private_file(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        for spec in REGISTRY.values():
            self.add(spec, now_ms)

    def close(self) -> None:
        self._db.close()

    def add(self, spec: TaskSpec, now_ms: int) -> SignedTask:
        """Sign `spec` with the MID key and keep it. The same spec again returns the entry kept; another spec under
        the same id@version is refused (policy_violation)."""
        envelope = seal_task_spec(spec, self.mid_key)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                kept = self._find(spec.id, spec.version)
                if kept is None:
                    row = (spec.id, spec.version, envelope, now_ms)
                    self._db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?)", row)
                    kept = SignedTask(spec, envelope, now_ms)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if kept.spec != spec:
            raise PolicyViolationError(
                "a published task spec never changes: publish a new version", task=spec.key, added_ms=kept.added_ms
            )
        return kept

    def get(self, task_id: str, version: int) -> SignedTask:
        """The entry for task_id@version; raises UnknownTaskError naming the tasks the catalogue holds."""
        with self._lock:
            kept = self._find(task_id, version)
        if kept is None:
            raise UnknownTaskError(
                "unknown task", task_id=task_id, version=version, known=[t.spec.key for t in self.list()]
            )
        return kept

    def list(self) -> list[SignedTask]:
        """Every task, by id and version."""
        with self._lock:
            rows = self._db.execute("SELECT envelope, added_ms FROM tasks ORDER BY task_id, version").fetchall()
        return [self._entry(envelope, added_ms) for envelope, added_ms in rows]

    def _find(self, task_id: str, version: int) -> SignedTask | None:
        row = self._db.execute(
            "SELECT envelope, added_ms FROM tasks WHERE task_id=? AND version=?", (task_id, version)
        ).fetchone()
        return None if row is None else self._entry(row[0], row[1])

    def _entry(self, envelope: bytes, added_ms: int) -> SignedTask:
        # Read back as a device would: a row altered on disk fails here rather than being served.
        return SignedTask(open_task_spec(bytes(envelope), self.mid_key.verifier), bytes(envelope), int(added_ms))
