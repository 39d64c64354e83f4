"""The invitation nonces the MID issued, by Flower run id, read from the job book that `job start` writes.

`job start` draws one nonce per invited device and writes the job's record (coordinator.federation.job_start.JobRecord,
`<job id>.json`, atomically) before inviting anyone, and again with the run id as soon as `flwr run` returned it, so
before any round of the run can be captured. A record's nonces never change and its run id is set once, so each file
is parsed once it names a run (or ended without one); ingest asks per report and reads nothing while the run is known.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

log = logging.getLogger("midgate.federation")

RACY_NS = 2_000_000_000
"""A folder whose mtime is this close to the scan that saw it may change again within the same timestamp (coarse
file-system clocks, FAT's 2 s): such a scan is not trusted to stand for the folder's contents."""

_ENDED = frozenset({"completed", "failed"})


class _JobNonces(BaseModel):
    """The fields of a JobRecord the nonce check needs; the rest is ignored, so that a record whose request no longer
    validates (a task since retired from the registry) still yields its nonces."""

    model_config = ConfigDict(extra="ignore")

    nonces: dict[str, str]
    run_id: int | None = None
    status: str = "inviting"
    started_ms: int = 0


class IssuedNonces:
    """Read-through cache of the job book's nonces by run id; one thread calls it (the ingest pipeline's).

    Parameters
    ----------
    job_book_dir: the job book's folder (`CoordinatorSettings.job_book_dir`); it need not exist yet.
    clock: wall-clock nanoseconds, compared with the folder's mtime (default time.time_ns).

    A run id not seen yet costs one stat of the folder: only when the folder changed since the last scan (a record was
    written) are its files listed, and only the files not yet settled and changed since they were read are parsed.
    """

    def __init__(self, job_book_dir: Path, clock: Callable[[], int] = time.time_ns) -> None:
        self.job_book_dir = job_book_dir
        self._clock = clock
        self._by_run: dict[int, tuple[int, dict[str, str]]] = {}  # run id -> (started_ms, nonces)
        self._settled: set[str] = set()  # files that name a run, or ended without one: never read again
        self._read: dict[str, tuple[int, int]] = {}  # file name -> (mtime_ns, size) when last parsed
        self._scanned_mtime: int | None = None  # the folder's mtime at the last scan, if that scan is trusted
        self._folder_error = ""  # logged once, not per report

    def for_run(self, run_id: int) -> Mapping[str, str] | None:
        """Device id -> nonce the MID's invitation to `run_id`'s job carried; None when no job record names the run."""
        found = self._by_run.get(run_id)
        if found is None and self._rescan():
            found = self._by_run.get(run_id)
        return None if found is None else found[1]

    def _rescan(self) -> bool:
        """Read the job files written since the last scan; False when the folder cannot have changed since."""
        try:
            mtime = self.job_book_dir.stat().st_mtime_ns
            if mtime == self._scanned_mtime:
                return False
            names = sorted(n for n in os.listdir(self.job_book_dir) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return False  # no job started yet
        except OSError as exc:
            if repr(exc) != self._folder_error:
                self._folder_error = repr(exc)
                log.error("job book unreadable", extra={"path": str(self.job_book_dir), "error": repr(exc)})
            return False
        self._folder_error = ""
        for name in names:
            if name not in self._settled:
                self._read_file(name)
        self._scanned_mtime = mtime if self._clock() - mtime > RACY_NS else None
        return True

    def _read_file(self, name: str) -> None:
        path = self.job_book_dir / name
        try:
            st = path.stat()
            if self._read.get(name) == (st.st_mtime_ns, st.st_size):
                return
            self._read[name] = (st.st_mtime_ns, st.st_size)
            record = _JobNonces.model_validate(json.loads(path.read_bytes()), strict=False)
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            log.error("job record unreadable", extra={"path": str(path), "error": repr(exc)})
            return
        if record.run_id is not None:
            known = self._by_run.get(record.run_id)
            if known is not None:
                # Two jobs naming one run: only after the SuperLink's database was reset; the later job is the run's.
                log.warning("two job records name one run", extra={"run_id": str(record.run_id), "path": str(path)})
            if known is None or record.started_ms >= known[0]:
                self._by_run[record.run_id] = (record.started_ms, record.nonces)
        if record.run_id is not None or record.status in _ENDED:
            self._settled.add(name)
            self._read.pop(name, None)
