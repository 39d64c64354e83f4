"""`serve` logs what `job start` and `job settle` recorded: jobs, their rounds and their settlements.

The ledger has one writer, `serve`: `LedgerStore` refuses a second one, and serve's in-memory tree would go stale. So,
as with the registry's revocations (coordinator/registry/ledger_records.py), the two commands only record durably
what happened, in the job book (coordinator/federation/job_start.py `JobBook`), and `serve` appends it within a
second (`JobLedger.follow`, called from a task of its own, coordinator/serve/assembly.py):

- a job `job start` recorded as completed or failed: its JOB leaf, then one ROUND leaf per round the ServerApp
  captured, in one transaction (record formats in protocol/job_log.py). Node ids become devices and members through
  the job's own record of whom it invited, so a member who has left since is still named;
- a payment `job settle` recorded for a logged, completed job: the SETTLEMENT leaf that splits it under the MID's
  policy by the JOB leaf's attribution (coordinator/royalties/ledger_records.py `settle_logged_job`).

The ledger itself is the dedup store: a JOB leaf names its job id and a settlement's record id is derived from it,
so the follower reads the log once (its first pass) to learn what is there, then remembers what it appends. A job or
payment it cannot log is logged as an error once and tried again when its file changes.

The commands wait for these leaves by reading the ledger read-only (`wait_for_leaf`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from coordinator.capture.directory import capture_summary_path, read_round_summary
from coordinator.capture.round import RoundCapture
from coordinator.federation.job import JobOutcome, RoundAttribution
from coordinator.federation.job_start import JobBook, JobRecord
from coordinator.ledger.store import LedgerReader, LedgerStore
from coordinator.royalties.ledger_records import settle_logged_job, settlement_record_id
from coordinator.royalties.policy import RoyaltyPolicy
from coordinator.royalties.settlement import decode_record
from protocol.errors import MalformedError, ProtocolError
from protocol.job_attribution import union_groups
from protocol.job_log import (
    JobDeviceEntry,
    JobGroupEntry,
    JobGroupSet,
    JobLogRecord,
    MemberValue,
    RoundDropEntry,
    RoundLogRecord,
    RoundSameDataPair,
    RoundUpdateEntry,
    decode_job_record,
    split_round_record,
)
from protocol.leaves import Leaf, LeafKind, decode_leaf

log = logging.getLogger("midgate.federation")
T = TypeVar("T")

FOLLOW_PERIOD_S = 0.25
"""Seconds between `serve`'s looks at the job book: a pass that finds nothing new lists two folders, and a job's
JOB leaf is what `job start` waits for before it exits."""
_TEXT = 256  # protocol.messages.ShortText


def job_log_records(record: JobRecord, jobs_dir: Path) -> tuple[JobLogRecord, list[RoundLogRecord]]:
    """The JOB record and the ROUND records of a completed or failed job, from its job book record, its outcome and
    the round summaries its ServerApp wrote under `jobs_dir` (coordinator.capture.directory)."""
    if record.status not in ("completed", "failed"):
        raise MalformedError("only an ended job is logged", job=record.request.job_id, status=record.status)
    outcome = record.outcome or JobOutcome(run_id=record.run_id or 0, status="failed")
    devices = {d.node_id: d for d in record.invited}

    def device_of(node: int | str) -> tuple[str, str]:
        device = devices.get(int(node))
        if device is None:
            raise MalformedError("a node the job did not invite", job=record.request.job_id, node_id=int(node))
        return device.device_id, device.member_id

    request = record.request
    job_groups, job_group_sets = _job_groups(outcome, lambda node: device_of(node)[1])
    job = JobLogRecord(
        job_id=request.job_id,
        run_id=record.run_id,
        task_id=request.task_id,
        task_version=request.task_version,
        purpose=request.purpose,
        buyer=request.buyer,
        status=record.status,
        reason=record.reason[:_TEXT],
        rounds=request.rounds,
        rounds_completed=record.rounds_completed,
        started_ms=record.started_ms,
        ended_ms=record.ended_ms or record.started_ms,
        devices=tuple(
            JobDeviceEntry(
                device=d.device_id,
                member=d.member_id,
                node_id=d.node_id,
                selected=d.node_id in record.selected_node_ids,
            )
            for d in record.invited
        ),
        final_model_sha256=outcome.final_model_sha256 or None,
        model_version=record.model_version,
        final_validation={k: v for k, v in outcome.final_validation.items() if math.isfinite(v) and v >= 0},
        attribution=_member_values(outcome, lambda node: device_of(node)[1]),
        job_groups=job_groups,
        job_group_sets=job_group_sets,
        same_data_kept=outcome.same_data_kept if outcome.attribution else None,
    )
    rounds = []
    server_round = 1
    while record.run_id is not None:
        path = capture_summary_path(jobs_dir, record.run_id, server_round)
        if not path.exists():
            break
        rounds.append(_round_record(record, outcome, read_round_summary(path.read_bytes(), server_round), device_of))
        server_round += 1
    return job, rounds


def _member_values(outcome: JobOutcome, member_of: Callable[[str], str]) -> tuple[MemberValue, ...]:
    """Each member's attribution over the job: its devices' values, rounds and excluded rounds summed, their screens
    joined (a member with two devices is one payee)."""
    totals: dict[str, tuple[int, int, int, set[str]]] = {}
    for node, units in outcome.attribution.items():
        member = member_of(node)
        history = outcome.attribution_history.get(node)
        value, rounds, excluded, screens = totals.get(member, (0, 0, 0, set()))
        if history is not None:
            rounds, excluded = rounds + history.rounds, excluded + history.excluded_rounds
            screens = screens | set(history.screens)
        totals[member] = (value + units, rounds, excluded, screens)
    return tuple(
        MemberValue(member=m, value_units=v, rounds=r, excluded_rounds=x, screens=tuple(sorted(s)))
        for m, (v, r, x, s) in sorted(totals.items())
    )


def _job_groups(
    outcome: JobOutcome, member_of: Callable[[str], str]
) -> tuple[tuple[JobGroupEntry, ...], tuple[JobGroupSet, ...]]:
    """The job's same-data pairs by node id, smaller first, with the rounds paid as one: every set of three or more
    nodes of which each pair is a job group paid as one in the same rounds (a data set's copies) written once, as a
    JobGroupSet; the other pairs with their members."""
    by_rounds: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for group in outcome.job_groups:
        by_rounds.setdefault(tuple(group.rounds), []).append(_node_pair(group.pair))
    entries, sets = [], []
    for rounds, pairs in by_rounds.items():
        components = union_groups(sorted({node for pair in pairs for node in pair}), pairs)
        component_of = {node: i for i, component in enumerate(components) for node in component}
        inside = Counter(component_of[first] for first, _ in pairs)
        whole = {i for i, c in enumerate(components) if len(c) > 2 and inside[i] == len(c) * (len(c) - 1) // 2}
        sets += [JobGroupSet(nodes=components[i], rounds=rounds) for i in sorted(whole)]
        entries += [
            JobGroupEntry(nodes=pair, members=(member_of(str(pair[0])), member_of(str(pair[1]))), rounds=rounds)
            for pair in pairs
            if component_of[pair[0]] not in whole
        ]
    return tuple(sorted(entries, key=lambda entry: entry.nodes)), tuple(sorted(sets, key=lambda s: s.nodes))


NodeGroups = tuple[tuple[int, ...], ...]


def _round_evidence(valued: RoundAttribution | None) -> tuple[NodeGroups, tuple[RoundSameDataPair, ...]]:
    """A valued round's players of more than one node and its same-data similarities, by node id in the ROUND
    leaf's order (what the job's settlement read of the round)."""
    if valued is None:
        return (), ()
    groups = sorted(tuple(sorted(int(node) for node in group)) for group in valued.groups)
    pairs = [RoundSameDataPair(nodes=_node_pair(s.pair), similarity_milli=s.similarity_milli) for s in valued.same_data]
    return tuple(groups), tuple(sorted(pairs, key=lambda pair: pair.nodes))


def _node_pair(pair: tuple[str, str]) -> tuple[int, int]:
    first, second = sorted(int(node) for node in pair)
    return first, second


def _round_record(
    record: JobRecord, outcome: JobOutcome, capture: RoundCapture, device_of: Callable[[int | str], tuple[str, str]]
) -> RoundLogRecord:
    valued = outcome.attribution_rounds.get(capture.round)
    updates = []
    for update in capture.updates:
        device, member = device_of(update.node_id)
        node = str(update.node_id)
        updates.append(
            RoundUpdateEntry(
                device=device,
                member=member,
                node_id=update.node_id,
                update_sha256=update.update_sha256,
                examples_reported=update.examples_reported,
                value_units=None if valued is None else valued.values.get(node),
                excluded=valued is not None and node in valued.excluded,
                screens=() if valued is None else tuple(valued.screens.get(node, ())),
            )
        )
    invited = {d.node_id: d.device_id for d in record.invited}
    drops = tuple(
        RoundDropEntry(device=invited.get(d.node_id), node_id=d.node_id, reason=str(d.reason), detail=d.detail[:_TEXT])
        for d in capture.drops
    )
    groups, same_data = _round_evidence(valued)
    skipped = ""
    if valued is None:
        skipped = outcome.attribution_skipped.get(capture.round, "") or (
            "not valued" if record.request.attribution else "the job ran without attribution"
        )
    return RoundLogRecord(
        job_id=record.request.job_id,
        run_id=capture.run_id,
        round=capture.round,
        global_sha256=capture.global_sha256,
        updates=tuple(updates),
        drops=drops,
        valuation="" if valued is None else valued.method,
        skipped=skipped[:_TEXT],
        groups=groups,
        same_data=same_data,
    )


@dataclass(frozen=True)
class LoggedJob:
    job_id: str
    first_index: int
    round_leaves: int
    """One per round, or a round's parts (protocol.job_log.split_round_record)."""
    model_version: str | None


class JobLedger:
    """Appends the JOB and ROUND leaves of every ended job in the job book, and the SETTLEMENT of every payment
    recorded for a logged, completed job; one thread at a time calls `follow`.

    Parameters
    ----------
    book: the job book `job start` and `job settle` write.
    jobs_dir: where the jobs' round captures are (`[federation] jobs_dir`).
    ledger: the MID's log; this process is its writer.
    policy: the MID's royalty policy payments are settled under, or what gives it for a logged job (`serve`: the
        POLICY leaf version in force when the job started, coordinator.serve.assembly `settlement_policy`).
    currency: the MID's currency; a payment in another is not settled.
    """

    def __init__(
        self,
        book: JobBook,
        jobs_dir: Path,
        ledger: LedgerStore,
        policy: RoyaltyPolicy | Callable[[JobLogRecord], RoyaltyPolicy],
        currency: str,
    ) -> None:
        self.book = book
        self.jobs_dir = jobs_dir
        self.ledger = ledger
        fixed = policy
        self.policy_for: Callable[[JobLogRecord], RoyaltyPolicy] = (
            (lambda job: fixed) if isinstance(fixed, RoyaltyPolicy) else fixed
        )
        self.currency = currency
        self._jobs: dict[str, int] | None = None  # job id -> its JOB leaf's index (None: the log not read yet)
        self._settlements: set[str] = set()  # record ids of the settlements in the log
        self._failed: dict[Path, int] = {}  # a file that could not be logged -> its mtime then

    def follow(self) -> list[int]:
        """Log every ended job not in the ledger yet, then settle every recorded payment not settled yet; returns
        the indices of the leaves appended."""
        appended: list[int] = []
        for job_id in self.book.job_ids():
            if self._jobs is not None and job_id in self._jobs:
                continue
            logged = self._attempt(self.book.path(job_id), self._log_job, job_id)
            if logged is not None:
                appended += range(logged.first_index, logged.first_index + 1 + logged.round_leaves)
        for job_id in self.book.paid_job_ids():
            index = self._attempt(self.book.payments_dir / f"{job_id}.json", self._settle, job_id)
            if index is not None:
                appended.append(index)
        return appended

    def _attempt(self, path: Path, action: Callable[[str], T | None], job_id: str) -> T | None:
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        if self._failed.get(path) == mtime:
            return None
        try:
            return action(job_id)
        except (ProtocolError, OSError, ValueError) as error:  # ValueError: pydantic's, a record it cannot read
            self._failed[path] = mtime
            log.error("job book entry not logged", extra={"file": str(path), "reason": str(error)[:500]})
            return None

    def _known_jobs(self) -> dict[str, int]:
        """The job ids with a JOB leaf (and the settlements' record ids), read from the log on first use."""
        if self._jobs is None:
            jobs: dict[str, int] = {}
            for index, data in self.ledger.leaves(0, self.ledger.size):
                leaf = decode_leaf(data)
                if leaf.kind is LeafKind.JOB:
                    jobs[decode_job_record(leaf.signed).job_id] = index
                elif leaf.kind is LeafKind.SETTLEMENT:
                    self._settlements.add(decode_record(leaf.signed).inputs.record_id)
            self._jobs = jobs
        return self._jobs

    def _log_job(self, job_id: str) -> LoggedJob | None:
        jobs = self._known_jobs()
        if job_id in jobs:
            return None
        record = self.book.read(job_id)
        if record is None or record.status not in ("completed", "failed"):
            return None
        job, rounds = job_log_records(record, self.jobs_dir)
        leaves = [Leaf(LeafKind.JOB, job.canonical_json())]
        leaves += [Leaf(LeafKind.ROUND, part.canonical_json()) for r in rounds for part in split_round_record(r)]
        first = self.ledger.append_leaves(leaves).first_index
        jobs[job_id] = first
        log.info(
            "job logged",
            extra={"job": job_id, "status": job.status, "leaves": f"{first}..{first + len(leaves) - 1}",
                   "rounds": len(rounds), "model_version": job.model_version or "-"},
        )  # fmt: skip
        return LoggedJob(job_id, first, len(leaves) - 1, job.model_version)

    def _settle(self, job_id: str) -> int | None:
        jobs = self._known_jobs()
        if settlement_record_id(job_id) in self._settlements or job_id not in jobs:
            return None  # settled, or its job is not logged yet (the next pass settles it)
        payment = self.book.payment(job_id)
        if payment is None:
            return None
        if payment.currency != self.currency:
            raise MalformedError("payment currency is not the MID's", expected=self.currency, found=payment.currency)
        job = decode_job_record(decode_leaf(self.ledger.leaf(jobs[job_id])).signed)
        booked = self.book.read(job_id)
        index = settle_logged_job(
            self.ledger,
            job,
            payment.payment_minor,
            currency=payment.currency,
            created_ms=payment.recorded_ms,
            policy=self.policy_for(job),
            knobs_milli=booked.knobs_milli if booked is not None else None,  # the knobs when the job started
        )
        self._settlements.add(settlement_record_id(job_id))
        log.info("job settled", extra={"job": job_id, "leaf_index": index, "payment_minor": payment.payment_minor})
        return index

    async def run(self, stopped: asyncio.Event, period_s: float = FOLLOW_PERIOD_S) -> None:
        """Follow the job book until `stopped` is set; the appends run in a worker thread, off the event loop."""
        while not stopped.is_set():
            try:
                await asyncio.to_thread(self.follow)
            except Exception:
                # A storage error must not end serve: the next pass tries again.
                log.exception("following the job book failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), timeout=period_s)


def wait_for_leaf(
    ledger_path: Path,
    match: Callable[[Leaf], bool],
    timeout_s: float,
    *,
    start: int = 0,
    poll_s: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
) -> int | None:
    """The index of the first leaf at or after `start` that `match` accepts, reading the ledger read-only while
    `serve` appends to it; None when none appeared within `timeout_s`."""
    deadline = clock() + timeout_s
    while True:
        if ledger_path.exists():
            with LedgerReader.open_existing(ledger_path) as reader:
                for index, data in reader.leaves(start, reader.size):
                    if match(decode_leaf(data)):
                        return index
                start = max(start, reader.size)
        if clock() >= deadline:
            return None
        time.sleep(poll_s)


def is_job_leaf(job_id: str) -> Callable[[Leaf], bool]:
    """Matches the JOB leaf of `job_id`."""
    return lambda leaf: leaf.kind is LeafKind.JOB and decode_job_record(leaf.signed).job_id == job_id


def is_settlement_leaf(job_id: str) -> Callable[[Leaf], bool]:
    """Matches the SETTLEMENT leaf of `job_id`."""
    record_id = settlement_record_id(job_id)
    return lambda leaf: leaf.kind is LeafKind.SETTLEMENT and decode_record(leaf.signed).inputs.record_id == record_id
