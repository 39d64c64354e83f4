"""Members' reputation as the MID's log shows it, and which members meet the policy's minimum per job class: the
one rule both the buyer market's quotes (coordinator/market/desk.py) and `coordinator job start`
(coordinator/federation/job_start.py) select members by.

The evidence is the attribution every JOB leaf carries (protocol.job_log.MemberValue: a member's value over the job,
the rounds it was valued in, the rounds a screen excluded it from), taken in log order into the same beta reputation
as coordinator.attribution.reputation.ReputationBook, job by job rather than round by round: a member's admitted
rounds count good when its value over the job was positive and bad otherwise, each excluded round counts
`exclusion_weight` bad, and earlier evidence fades by `forgetting` per round of the job. A member with no logged job
scores 500. Anyone with the log recomputes the same scores.

A job's class is its purpose code (`research`, `health`, ...): the policy's `[reputation] min_milli` gives each class
its minimum, `default` the rest. Blocking; LoggedReputation reads each leaf once per process (the leaves appended
since the last call), logged_scores the whole log once per call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from coordinator.attribution.reputation import ReputationBook
from coordinator.ledger.store import LedgerReader
from coordinator.policy.document import MidPolicy
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


Scores = Callable[[list[str]], dict[str, int]]
"""Members -> each one's reputation (milli-units): LoggedReputation.scores, or logged_scores on a ledger file."""


def logged_scores(ledger_path: Path, members: list[str]) -> dict[str, int]:
    """Each member's reputation over every job logged so far in the ledger at `ledger_path`, read once (a command
    beside `serve`); with no ledger yet, nobody has a logged job and every member scores the neutral 500."""
    if not ledger_path.exists():
        book = ReputationBook()
        return {m: book.score_milli(m) for m in members}
    with LedgerReader.open_existing(ledger_path) as reader:
        return LoggedReputation(reader).scores(members)


def below_minimum(policy: MidPolicy | None, purpose: str, members: Iterable[str], scores: Scores) -> dict[str, str]:
    """The members whose reputation is below `policy`'s minimum for a job of class `purpose`, each with why (member
    -> reason); none, and no score asked, when there is no policy or its minimum for the class is 0."""
    minimum = policy.min_reputation_milli(purpose) if policy is not None else 0
    if minimum <= 0:
        return {}
    found = scores(sorted(set(members)))
    return {
        member: f"reputation {score} below the policy's minimum {minimum} for purpose {purpose}"
        for member, score in sorted(found.items())
        if score < minimum
    }
