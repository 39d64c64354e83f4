"""A follower of the MID's log that keeps what the dashboard and the job report show: the JOB, ROUND, SETTLEMENT and
ROYALTY leaves by job, the count of leaves by kind, and how the log grew. It reads only the leaves appended since its
last look (`refresh`), so a page served on a log of millions of contribution leaves costs one indexed range read
when nothing changed, not a scan (Tessera's followers: they read the log beside the appender, never around it).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from coordinator.ledger.store import LedgerReader
from coordinator.royalties.settlement import SplitRecord, decode_record
from protocol.errors import ProtocolError
from protocol.job_log import JobLogRecord, RoundLogRecord, decode_job_record, decode_round_record, join_round_parts
from protocol.leaves import LeafKind, decode_leaf


@dataclass
class LoggedJob:
    """One job as its leaves tell it: the JOB leaf, its rounds (by the index of their first ROUND leaf; a round logged
    in parts joined), its settlement and the royalties on its model."""

    index: int
    record: JobLogRecord
    rounds: list[tuple[int, RoundLogRecord]] = field(default_factory=list)
    settlement: tuple[int, SplitRecord] | None = None
    royalties: list[tuple[int, SplitRecord]] = field(default_factory=list)


@dataclass
class LedgerDigest:
    """Call `refresh(reader)` before reading; one lock makes concurrent page renders safe."""

    size: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    jobs: dict[str, LoggedJob] = field(default_factory=dict)
    undecodable: int = 0
    """Leaves of a known kind whose body did not decode (counted, never fatal: a page still renders)."""
    _parts: dict[tuple[str, int], list[tuple[int, RoundLogRecord]]] = field(default_factory=dict, repr=False)
    """The parts of a round logged in parts, until the last is read."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def refresh(self, reader: LedgerReader) -> LedgerDigest:
        with self._lock:
            end = reader.size
            for index, data in reader.leaves(self.size, end):
                try:
                    self._add(index, data)
                except ProtocolError:
                    self.undecodable += 1
                self.size = index + 1
            self.size = max(self.size, end)
        return self

    def _add(self, index: int, data: bytes) -> None:
        leaf = decode_leaf(data)
        self.kinds[leaf.kind.name] += 1
        if leaf.kind is LeafKind.JOB:
            record = decode_job_record(leaf.signed)
            self.jobs[record.job_id] = LoggedJob(index, record)
        elif leaf.kind is LeafKind.ROUND:
            round_record = decode_round_record(leaf.signed)
            job = self.jobs.get(round_record.job_id)
            if job is None:
                return
            if round_record.parts == 1:
                job.rounds.append((index, round_record))
                return
            parts = self._parts.setdefault((round_record.job_id, round_record.round), [])
            parts.append((index, round_record))
            if len(parts) == round_record.parts:
                del self._parts[(round_record.job_id, round_record.round)]
                job.rounds.append((min(i for i, _ in parts), join_round_parts(r for _, r in parts)[0]))
        elif leaf.kind in (LeafKind.SETTLEMENT, LeafKind.ROYALTY):
            split = decode_record(leaf.signed)
            job = self.jobs.get(split.inputs.attribution.job_id)
            if job is None:
                return
            if leaf.kind is LeafKind.SETTLEMENT:
                job.settlement = (index, split)
            else:
                job.royalties.append((index, split))
