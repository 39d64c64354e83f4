"""A MID with one ended, valued, settled job and a royalty on its model, built through the real code paths: the
job book `job start` writes (reusing tests/test_job_ledger.py's job: four devices of three members, one screened),
`serve`'s job-book follower appending the JOB, ROUND and SETTLEMENT leaves, and a buyer's revenue report split as a
ROYALTY leaf. The dashboard and report tests read what these left."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from test_job_ledger import DEVICES, NOW_MS, POLICY, _ended

from coordinator.federation.job_ledger import JobLedger
from coordinator.federation.job_start import JobBook, JobPayment
from coordinator.ledger.store import LedgerStore
from coordinator.royalties.ledger_records import report_revenue
from coordinator.royalties.settlement import SplitRecord, decode_record
from protocol.leaves import LeafKind, decode_leaf

JOB = "job-7"
PAYMENT = 10_000
REVENUE = 3_000
VALIDATION = {1: {"accuracy": 0.5, "loss": 1.2}, 2: {"accuracy": 0.81, "loss": 0.6}}


@dataclass
class SettledMid:
    ledger: LedgerStore
    book: JobBook
    jobs_dir: Path
    settlement: SplitRecord
    royalty: SplitRecord


def settled_mid(tmp_path: Path, ledger: LedgerStore) -> SettledMid:
    book = JobBook(tmp_path / "job-book")
    record = _ended(tmp_path, JOB)
    assert record.outcome is not None
    record.outcome.validation = VALIDATION
    book.write(record)
    follower = JobLedger(book, tmp_path / "jobs", ledger, POLICY, "EUR")
    follower.follow()
    book.record_payment(JobPayment(job_id=JOB, payment_minor=PAYMENT, currency="EUR", recorded_ms=NOW_MS))
    [settled] = follower.follow()
    assert record.model_version is not None
    royalty = report_revenue(
        ledger, record.model_version, REVENUE, record_id="revenue-1", created_ms=NOW_MS + 1, currency="EUR"
    )
    return SettledMid(
        ledger,
        book,
        tmp_path / "jobs",
        decode_record(decode_leaf(ledger.leaf(settled)).signed),
        decode_record(decode_leaf(ledger.leaf(royalty)).signed),
    )


def kinds(ledger: LedgerStore) -> list[LeafKind]:
    return [decode_leaf(data).kind for _, data in ledger.leaves(0, ledger.size)]


__all__ = ["DEVICES", "JOB", "PAYMENT", "REVENUE", "VALIDATION", "SettledMid", "kinds", "settled_mid"]
