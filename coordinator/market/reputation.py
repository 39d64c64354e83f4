"""Members' reputation as the MID's log shows it, for the policy's minimum per job class at quote time.

The evidence is the attribution every JOB leaf carries (protocol.job_log.MemberValue: a member's value over the job,
the rounds it was valued in, the rounds a screen excluded it from), taken in log order into the same beta reputation
as coordinator.attribution.reputation.ReputationBook, job by job rather than round by round: a member's admitted
rounds count good when its value over the job was positive and bad otherwise, each excluded round counts
`exclusion_weight` bad, and earlier evidence fades by `forgetting` per round of the job. A member with no logged job
scores 500. Anyone with the log recomputes the same scores.

A job's class is its purpose code (`research`, `health`, ...): the policy's `[reputation] min_milli` gives each class
its minimum, `default` the rest. Blocking; reads each leaf once per process (the leaves appended since the last call).
"""

from __future__ import annotations

import threading

from coordinator.attribution.reputation import ReputationBook
from coordinator.ledger.store import LedgerReader
from protocol.job_log import JobLogRecord, decode_job_record
from protocol.leaves import LeafKind, decode_leaf


def record_job(book: ReputationBook, job: JobLogRecord) -> None:
    """Take one logged job's attribution as evidence for its members (module docstring)."""
    for member in job.attribution:
        admitted = max(0, member.rounds - member.excluded_rounds)
        fade = book.forgetting**member.rounds
        good = book.good.get(member.member, 0.0) * fade
        bad = book.bad.get(member.member, 0.0) * fade + book.exclusion_weight * member.excluded_rounds
        if member.value_units > 0:
            good += admitted
        else:
            bad += admitted
        book.good[member.member], book.bad[member.member] = good, bad


class LoggedReputation:
    """Members' reputation from the JOB leaves of `reader`'s log, kept up to date incrementally."""

    def __init__(self, reader: LedgerReader) -> None:
        self.reader = reader
        self.book = ReputationBook()
        self._scanned = 0
        self._lock = threading.Lock()

    def scores(self, members: list[str]) -> dict[str, int]:
        """Each member's reputation (milli-units) over every job logged so far."""
        with self._lock:
            size = self.reader.size
            for _, data in self.reader.leaves(self._scanned, size):
                leaf = decode_leaf(data)
                if leaf.kind is LeafKind.JOB:
                    record_job(self.book, decode_job_record(leaf.signed))
            self._scanned = size
            return {m: self.book.score_milli(m) for m in members}
