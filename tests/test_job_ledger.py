"""A job ends in the ledger: `serve`'s follower of the job book (coordinator/federation/job_ledger.py) logs an ended
job as a JOB leaf and its ROUND leaves, settles a payment `job settle` recorded as a SETTLEMENT leaf under the MID's
policy, never twice (the ledger is the dedup store, also across restarts), and a buyer's revenue for the job's model
version is split by that settlement while an unknown version is refused `unknown_model`. `job settle` itself runs
here against a follower in a thread; tests/test_job_settlement_e2e.py runs it against the real `serve`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, DropReason, NodeDrop, RoundCapture
from coordinator.config import RoyaltySettings
from coordinator.federation.job import JobOutcome, NodeHistory, RoundAttribution
from coordinator.federation.job_cli import app as job_app
from coordinator.federation.job_ledger import JobLedger, is_job_leaf, is_settlement_leaf, wait_for_leaf
from coordinator.federation.job_start import JobBook, JobDevice, JobPayment, JobRecord, JobRequest
from coordinator.ledger.store import LedgerStore
from coordinator.royalties.ledger_records import report_revenue
from coordinator.royalties.settlement import decode_record
from protocol.errors import UnknownModelError
from protocol.identity import SignerKey
from protocol.job_log import decode_job_record, decode_round_record, model_version
from protocol.leaves import LeafKind, decode_leaf
from protocol.tasks.arrays import arrays_sha256

NOW_MS = 1_795_000_000_000
RUN = 5
FINAL_SHA = "ab" * 32
POLICY = RoyaltySettings(fee_bps=2000).policy()
# Four devices of three members: ann has two, cid's device is a free rider the screens excluded.
DEVICES = [
    JobDevice(device_id="d-a", member_id="ann", node_id=11),
    JobDevice(device_id="d-b", member_id="ann", node_id=12),
    JobDevice(device_id="d-c", member_id="bob", node_id=13),
    JobDevice(device_id="d-d", member_id="cid", node_id=14),
]


def _request(tmp_path: Path, job_id: str) -> JobRequest:
    return JobRequest(
        job_id=job_id,
        task_id="plaid-appliance",
        task_version=1,
        rounds=2,
        validation_path=tmp_path / "validation.npz",
        purpose="research",
        buyer="acme",
        min_nodes=1,
    )


def _capture(jobs_dir: Path, run_id: int, server_round: int, nodes: list[int], drops: list[NodeDrop]) -> None:
    global_arrays = {"w": np.zeros(3, dtype=np.float32)}
    updates = []
    for node in nodes:
        arrays = {"w": np.full(3, node + server_round, dtype=np.float32)}
        updates.append(
            CapturedUpdate(server_round, node, arrays, arrays_sha256(arrays), arrays_sha256(global_arrays), 40, 1, {})
        )
    capture = RoundCapture(run_id, server_round, arrays_sha256(global_arrays), tuple(updates), tuple(drops))
    CaptureDirectory(jobs_dir / f"run-{run_id}").on_round(capture)


def _outcome() -> JobOutcome:
    """Round 1: all four valued, cid (node 14) excluded; round 2: cid dropped (no reply)."""
    return JobOutcome(
        run_id=RUN,
        status="finished",
        rounds_completed=2,
        final_model_sha256=FINAL_SHA,
        final_validation={"accuracy": 0.81, "loss": 0.6},
        attribution={"11": 300, "12": 100, "13": 500, "14": 0},
        attribution_history={
            "11": NodeHistory(rounds=2),
            "12": NodeHistory(rounds=2),
            "13": NodeHistory(rounds=2),
            "14": NodeHistory(rounds=1, excluded_rounds=1, screens=["zero_update"]),
        },
        attribution_rounds={
            1: RoundAttribution(
                method="exact",
                values={"11": 200, "12": 50, "13": 250, "14": 0},
                screens={"14": ["zero_update"]},
                excluded=["14"],
            ),
            2: RoundAttribution(method="exact", values={"11": 100, "12": 50, "13": 250}),
        },
    )


def _ended(tmp_path: Path, job_id: str = "job-7", status: str = "completed") -> JobRecord:
    """A job as `job start` leaves it in the book once it ended, with its two rounds' captures on disk."""
    jobs_dir = tmp_path / "jobs"
    _capture(jobs_dir, RUN, 1, [11, 12, 13, 14], [])
    _capture(jobs_dir, RUN, 2, [11, 12, 13], [NodeDrop(2, 14, DropReason.NO_REPLY, "no reply in 120 s")])
    outcome = _outcome()
    return JobRecord(
        request=_request(tmp_path, job_id),
        invited=DEVICES,
        nonces={d.device_id: "ab" * 16 for d in DEVICES},
        selected_node_ids=[11, 12, 13, 14],
        run_id=RUN,
        status=status,  # type: ignore[arg-type]
        flower_status="finished:completed",
        rounds_completed=2,
        started_ms=NOW_MS,
        ended_ms=NOW_MS + 60_000,
        outcome=outcome,
        model_version=model_version(job_id, FINAL_SHA) if status == "completed" else None,
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerStore]:
    with LedgerStore.open(tmp_path / "ledger.sqlite", SignerKey.generate("midgate/test-mid")) as store:
        yield store


def _follower(tmp_path: Path, ledger: LedgerStore) -> JobLedger:
    return JobLedger(JobBook(tmp_path / "job-book"), tmp_path / "jobs", ledger, POLICY, "EUR")


def _kinds(ledger: LedgerStore) -> list[LeafKind]:
    return [decode_leaf(data).kind for _, data in ledger.leaves(0, ledger.size)]


def test_an_ended_job_is_logged_once_as_its_job_leaf_and_a_round_leaf_per_captured_round(
    tmp_path: Path, ledger: LedgerStore
) -> None:
    book = JobBook(tmp_path / "job-book")
    record = _ended(tmp_path)
    record.status = "running"
    book.write(record)
    follower = _follower(tmp_path, ledger)
    assert follower.follow() == []  # a running job is not logged

    book.write(_ended(tmp_path))
    assert follower.follow() == [0, 1, 2]
    assert _kinds(ledger) == [LeafKind.JOB, LeafKind.ROUND, LeafKind.ROUND]
    job = decode_job_record(decode_leaf(ledger.leaf(0)).signed)
    assert (job.job_id, job.status, job.run_id, job.rounds_completed) == ("job-7", "completed", RUN, 2)
    assert job.model_version == "job-7:abababababababab" and job.final_model_sha256 == FINAL_SHA
    assert [(d.device, d.member, d.node_id, d.selected) for d in job.devices][:2] == [
        ("d-a", "ann", 11, True),
        ("d-b", "ann", 12, True),
    ]
    # Per member: ann's two devices are one payee; cid keeps its screen and exclusion.
    assert [(m.member, m.value_units, m.rounds, m.excluded_rounds, m.screens) for m in job.attribution] == [
        ("ann", 400, 4, 0, ()),
        ("bob", 500, 2, 0, ()),
        ("cid", 0, 1, 1, ("zero_update",)),
    ]
    first = decode_round_record(decode_leaf(ledger.leaf(1)).signed)
    assert (first.round, first.valuation, first.skipped, first.drops) == (1, "exact", "", ())
    by_device = {u.device: u for u in first.updates}
    assert (by_device["d-d"].member, by_device["d-d"].excluded, by_device["d-d"].screens) == (
        "cid",
        True,
        ("zero_update",),
    )
    assert (by_device["d-a"].value_units, by_device["d-a"].excluded) == (200, False)
    assert by_device["d-a"].update_sha256 == arrays_sha256({"w": np.full(3, 12, dtype=np.float32)})
    second = decode_round_record(decode_leaf(ledger.leaf(2)).signed)
    assert [(d.device, d.node_id, d.reason) for d in second.drops] == [("d-d", 14, "no_reply")]
    assert {u.device for u in second.updates} == {"d-a", "d-b", "d-c"}

    # Never twice: not by the same follower, nor by a new one (a restarted serve) reading the ledger.
    assert follower.follow() == []
    assert _follower(tmp_path, ledger).follow() == []
    assert wait_for_leaf(ledger.path, is_job_leaf("job-7"), 0) == 0


def test_a_failed_job_is_logged_without_a_model_and_its_rounds_unvalued_when_it_ran_without_attribution(
    tmp_path: Path, ledger: LedgerStore
) -> None:
    record = _ended(tmp_path, status="failed")
    record.reason = "too_few_replies"
    record.request = record.request.model_copy(update={"attribution": False})
    assert record.outcome is not None
    record.outcome = JobOutcome(run_id=RUN, status="failed", reason="too_few_replies", rounds_completed=2)
    JobBook(tmp_path / "job-book").write(record)
    assert _follower(tmp_path, ledger).follow() == [0, 1, 2]
    job = decode_job_record(decode_leaf(ledger.leaf(0)).signed)
    assert (job.status, job.reason, job.model_version, job.final_model_sha256, job.attribution) == (
        "failed",
        "too_few_replies",
        None,
        None,
        (),
    )
    rnd = decode_round_record(decode_leaf(ledger.leaf(1)).signed)
    assert (rnd.valuation, rnd.skipped) == ("", "the job ran without attribution")
    assert all(u.value_units is None for u in rnd.updates)


def test_a_recorded_payment_is_settled_once_under_the_policy_and_buyers_revenue_follows_the_model_version(
    tmp_path: Path, ledger: LedgerStore
) -> None:
    book = JobBook(tmp_path / "job-book")
    running = _ended(tmp_path)
    running.status = "running"
    book.write(running)
    payment = JobPayment(job_id="job-7", payment_minor=10_001, currency="EUR", recorded_ms=NOW_MS + 90_000)
    assert book.record_payment(payment) == payment
    # Once on record, a payment stays: another amount does not replace it.
    assert book.record_payment(payment.model_copy(update={"payment_minor": 1})) == payment
    follower = _follower(tmp_path, ledger)
    assert follower.follow() == []  # the job is not logged yet: its payment waits

    book.write(_ended(tmp_path))
    assert follower.follow() == [0, 1, 2, 3]
    assert _kinds(ledger)[3] is LeafKind.SETTLEMENT
    record = decode_record(decode_leaf(ledger.leaf(3)).signed)
    inputs = record.inputs
    assert (inputs.kind, inputs.record_id, inputs.created_ms) == ("settlement", "settlement-job-7", NOW_MS + 90_000)
    assert inputs.attribution.model_version == "job-7:abababababababab" and inputs.attribution.policy == POLICY
    paid = {p.member: p for p in record.payouts}
    assert record.fee_minor + sum(p.amount_minor for p in record.payouts) + record.unallocated_minor == 10_001
    assert record.fee_minor == 10_001 * 2000 // 10_000 and record.unallocated_minor == 0
    assert sum(p.amount_minor for p in record.payouts) >= 10_001 * 7 // 10
    # The excluded member follows docs/attribution.md: screened in most of its rounds, paid nothing.
    assert (paid["cid"].amount_minor, paid["cid"].reason) == (0, "screened")
    assert paid["bob"].amount_minor > paid["ann"].amount_minor > 0
    assert wait_for_leaf(ledger.path, is_settlement_leaf("job-7"), 0) == 3

    assert follower.follow() == [] and _follower(tmp_path, ledger).follow() == []  # never settled twice

    index = report_revenue(
        ledger, "job-7:abababababababab", 3_000, record_id="revenue-1", created_ms=NOW_MS + 1, currency="EUR"
    )
    royalty = decode_record(decode_leaf(ledger.leaf(index)).signed)
    assert royalty.inputs.attribution == inputs.attribution
    with pytest.raises(UnknownModelError) as refused:
        report_revenue(ledger, "job-7:0000000000000000", 3_000, record_id="revenue-2", created_ms=1, currency="EUR")
    assert refused.value.reason == "unknown_model"


def test_a_job_is_settled_at_the_knobs_its_members_had_when_it_started(tmp_path: Path, ledger: LedgerStore) -> None:
    book = JobBook(tmp_path / "job-book")
    book.write(_ended(tmp_path).model_copy(update={"knobs_milli": {"ann": 1000, "bob": -500}}))
    book.record_payment(JobPayment(job_id="job-7", payment_minor=10_001, currency="EUR", recorded_ms=NOW_MS))
    assert _follower(tmp_path, ledger).follow() == [0, 1, 2, 3]
    record = decode_record(decode_leaf(ledger.leaf(3)).signed)
    knobs = {m.member: m.knob_milli for m in record.inputs.attribution.members}
    assert knobs == {"ann": 1000, "bob": -500, "cid": 0}  # cid set none: the base price


def test_a_payment_in_another_currency_is_not_settled_and_said_once(
    tmp_path: Path, ledger: LedgerStore, caplog: pytest.LogCaptureFixture
) -> None:
    book = JobBook(tmp_path / "job-book")
    book.write(_ended(tmp_path))
    book.record_payment(JobPayment(job_id="job-7", payment_minor=500, currency="USD", recorded_ms=NOW_MS))
    follower = _follower(tmp_path, ledger)
    with caplog.at_level(logging.ERROR, logger="midgate.federation"):
        assert follower.follow() == [0, 1, 2]
        assert follower.follow() == []
    assert [r.getMessage() for r in caplog.records] == ["job book entry not logged"]
    assert LeafKind.SETTLEMENT not in _kinds(ledger)


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "coordinator.toml"
    config.write_text(f'mid = "test-mid"\ndata_dir = "{tmp_path / "data"}"\n[royalties]\nfee_bps = 2000\n')
    return config


def test_job_settle_refuses_what_cannot_be_paid_for(tmp_path: Path) -> None:
    config = _config(tmp_path)
    book = JobBook(tmp_path / "data" / "federation" / "job-book")
    book.write(_ended(tmp_path, "job-failed", status="failed"))
    book.write(_ended(tmp_path, "job-7"))
    runner = CliRunner()
    for job_id, currency, complaint in [
        ("job-none", "EUR", "no such job"),
        ("job-failed", "EUR", "the job is failed, not completed"),
        ("job-7", "USD", "policy_violation: the MID settles in EUR, not USD"),
    ]:
        result = runner.invoke(
            job_app, ["settle", job_id, "--payment", "100", "--currency", currency, "-c", str(config)]
        )
        assert result.exit_code == 2 and complaint in result.stderr, result.output
    assert book.paid_job_ids() == []


def test_job_settle_records_the_payment_and_prints_the_settlement_serve_appends(tmp_path: Path) -> None:
    config = _config(tmp_path)
    data = tmp_path / "data"
    book = JobBook(data / "federation" / "job-book")
    book.write(_ended(data / "federation", "job-7"))
    stop = threading.Event()
    with LedgerStore.open(data / "ledger.sqlite", SignerKey.generate("midgate/test-mid")) as ledger:
        follower = JobLedger(book, data / "federation" / "jobs", ledger, POLICY, "EUR")

        def serve() -> None:  # what serve's task does, every second
            while not stop.wait(0.05):
                follower.follow()

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            runner = CliRunner()
            args = ["settle", "job-7", "--payment", "10000", "--currency", "EUR", "-c", str(config)]
            result = runner.invoke(job_app, args)
            assert result.exit_code == 0, result.output
            assert "SETTLEMENT leaf 3, record settlement-job-7, model version job-7:abababababababab" in result.stdout
            assert "payment 10000 EUR: fee 2000 (policy v1, fee 2000 bps), members 8000, unallocated 0" in result.stdout
            assert "cid\t0\tscreened\t0" in result.stdout
            # The same payment again finds the same settlement; another amount is refused.
            again = runner.invoke(job_app, args)
            assert again.exit_code == 0 and "SETTLEMENT leaf 3" in again.stdout
            other = runner.invoke(
                job_app, ["settle", "job-7", "--payment", "5", "--currency", "EUR", "-c", str(config)]
            )
            assert other.exit_code == 2 and "already has a payment of 10000 EUR" in other.stderr
            shown = runner.invoke(job_app, ["show", "job-7", "-c", str(config)])
            assert '"model_version": "job-7:abababababababab"' in shown.stdout
            assert '"payment_minor": 10000' in shown.stdout
        finally:
            stop.set()
            thread.join()
        assert ledger.size == 4
