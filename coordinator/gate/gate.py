"""Contribution reports reach the ledger only for updates Flower delivered (issue 6).

With `[federation] enabled` every verified, deduplicated ContributionReport is cross-checked against the round
capture the strategy wrote (coordinator/gate/round_captures.py) before the ledger commit:

- the capture exists and names the signer's node with the same global-model and update hashes (and the same
  gradient and offset hashes: both null unless the round was drift-corrected): logged as before;
- no capture yet (the device reports right after replying to Flower, before the strategy has the whole round): the
  report waits in `pending_contributions` (its own SQLite file, `synchronous=FULL`, committed before the MQTT ack,
  so a crash loses nothing), and the service re-checks it every `capture_poll_s`; after `report_grace_s` without a
  capture it is refused `round_not_captured`;
- the capture says otherwise: refused `update_mismatch`, and the device is *flagged*: the signed envelope, what the
  capture holds and the reason are kept in `refused_contributions` (`midgate coordinator flags`), because the
  device's own signature proves it reported an update it did not send. A dropped node's report is refused
  `update_dropped`, unflagged.

Before that, the report's `round_nonce` must be the nonce the MID's invitation to the run's job gave the signing
device (the job book `job start` writes; coordinator.gate.issued_nonces), or it is refused
`wrong_round_nonce`, unflagged (an honest agent signs a record with its own run's nonce, edge.agent.job_node
`nonce_for`, but only once an invitation named that run; an earlier one falls back to the latest job's nonce).
A report whose job record is readable is checked on arrival, so a wrong nonce never waits. A run that no job
record names is refused `wrong_round_nonce` too, but only once its round is captured: `job start` records the run id
before the run's first round can end, so until then a missing record may only be late, and the report waits as any
other. Such runs exist only outside `job start` (a hand-made `flwr run` on the MID's SuperLink; tests and benchmarks
write a job record for theirs), and their devices hold no invitation of the MID for them: nothing the MID invited,
nothing logged. Without `[federation] enabled` there is no gate, no capture and no job book: reports are logged
unchecked, as in the demo and bench/ingest_bench.py.

Every refusal is final and answered with a MID-signed `Refusal` on the device's `down/refusal` topic, so its outbox
stops resending; a resend that arrives anyway is refused again from the stored row (and the notice re-sent).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from coordinator.capture.round import RoundCapture
from coordinator.gate.issued_nonces import IssuedNonces
from coordinator.gate.round_captures import RoundCaptures, capture_evidence, judge_report
from coordinator.gate.update_check import check_round_nonce
from coordinator.ingest.admission import Admission
from coordinator.ingest.pipeline import Candidate, InboundMessage, Outcome, Verdict
from coordinator.registry.store import Device, Registry
from coordinator.sqlite_files import immediate_transaction, open_wal
from protocol.envelope import envelope_digest, peek_envelope
from protocol.errors import EquivocationError, ProtocolError, Reason, RevokedKeyError, RoundNotCapturedError
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind
from protocol.messages import ContributionReport, Refusal
from protocol.topics import DownKind, UpKind, down_topic, up_topic

log = logging.getLogger("midgate.ingest")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending_contributions (
    key_id TEXT NOT NULL,
    seq TEXT NOT NULL,
    device TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    envelope BLOB NOT NULL,
    received_ms INTEGER NOT NULL,
    PRIMARY KEY (key_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refused_contributions (
    key_id TEXT NOT NULL,
    seq TEXT NOT NULL,
    device TEXT NOT NULL,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    node_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    flagged INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    envelope_sha256 TEXT NOT NULL,
    capture TEXT NOT NULL,
    refused_ms INTEGER NOT NULL,
    PRIMARY KEY (key_id, seq)
) WITHOUT ROWID;
"""

FLAGGING_REASONS = frozenset({Reason.UPDATE_MISMATCH})
"""Refusals that prove the device lied (its signature is on a false statement); the others are no one's fault."""


@dataclass(frozen=True)
class ReportedContribution:
    """A verified ContributionReport with who signed it (screening established the device and key id)."""

    device: str
    key_id: str
    message: ContributionReport
    envelope: bytes = field(repr=False)


def reported_contribution(envelope: bytes, device: str, key_id: str) -> ReportedContribution:
    """Parse a report whose signature and schema screening checked (so it parses; no canonical-form check again)."""
    _, payload, _ = peek_envelope(envelope)
    return ReportedContribution(device, key_id, ContributionReport.model_validate_json(payload), envelope)


@dataclass(frozen=True)
class RefusedContribution:
    """A refused report and its evidence; `flagged` when the refusal proves the device lied."""

    device: str
    key_id: str
    seq: int
    run_id: int
    round: int
    node_id: int
    reason: str
    detail: str
    flagged: bool
    envelope: bytes = field(repr=False)
    envelope_sha256: str
    capture: dict[str, object]
    refused_ms: int


class ContributionStore:
    """The SQLite file behind the gate (`CoordinatorSettings.contributions_path`); one thread writes it."""

    def __init__(self, path: Path) -> None:
        # FULL: a held report is acknowledged to the broker once this commit returns; nothing else holds it then.
        self._db = open_wal(path, "FULL", _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate_transaction(self._db)

    def refusal(self, key_id: str, seq: int) -> RefusedContribution | None:
        row = self._db.execute(_REFUSED_SELECT + " WHERE key_id = ? AND seq = ?", (key_id, str(seq))).fetchone()
        return None if row is None else _refused(row)

    def pending_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM pending_contributions").fetchone()[0])

    def pending_digests(self) -> dict[tuple[str, int], bytes]:
        """(key id, seq) -> envelope SHA-256 of every waiting report."""
        rows = self._db.execute("SELECT key_id, seq, envelope FROM pending_contributions")
        return {(key_id, int(seq)): envelope_digest(bytes(envelope)) for key_id, seq, envelope in rows}

    def refused_keys(self) -> set[tuple[str, int]]:
        return {(key_id, int(seq)) for key_id, seq in self._db.execute("SELECT key_id, seq FROM refused_contributions")}

    def pending_rounds(self) -> list[tuple[int, int, int]]:
        """(run id, round, oldest received_ms) of every round that reports wait for."""
        rows = self._db.execute(
            "SELECT run_id, round, MIN(received_ms) FROM pending_contributions GROUP BY run_id, round ORDER BY 3"
        )
        return [(int(run_id), int(rnd), int(oldest)) for run_id, rnd, oldest in rows]

    def pending(self, run_id: int, server_round: int, limit: int) -> list[tuple[ReportedContribution, int]]:
        """Reports waiting for one round, oldest first, with the time each was received."""
        rows = self._db.execute(
            "SELECT device, key_id, seq, envelope, received_ms FROM pending_contributions"
            " WHERE run_id = ? AND round = ? ORDER BY received_ms LIMIT ?",
            (str(run_id), server_round, limit),
        ).fetchall()
        return [
            (reported_contribution(bytes(envelope), device, key_id), int(received_ms))
            for device, key_id, seq, envelope, received_ms in rows
        ]

    def refusals(self, flagged_only: bool = False, device: str | None = None) -> list[RefusedContribution]:
        query = _REFUSED_SELECT + " WHERE (? = 0 OR flagged = 1) AND (? IS NULL OR device = ?) ORDER BY refused_ms"
        return [_refused(row) for row in self._db.execute(query, (int(flagged_only), device, device))]

    def flag_counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT device, COUNT(*) FROM refused_contributions WHERE flagged = 1 GROUP BY device")
        return {device: int(n) for device, n in rows}


def hold(db: sqlite3.Connection, report: ReportedContribution, now_ms: int) -> None:
    db.execute(
        "INSERT OR IGNORE INTO pending_contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            report.key_id,
            str(report.message.seq),
            report.device,
            str(report.message.run_id),
            report.message.round,
            str(report.message.node_id),
            report.envelope,
            now_ms,
        ),
    )


def record_refusal(db: sqlite3.Connection, refused: RefusedContribution) -> None:
    """Keep the refusal (first one wins: a resend is refused from it) and drop any pending row of the report."""
    db.execute(
        "INSERT OR IGNORE INTO refused_contributions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            refused.key_id,
            str(refused.seq),
            refused.device,
            str(refused.run_id),
            refused.round,
            str(refused.node_id),
            refused.reason,
            refused.detail,
            int(refused.flagged),
            refused.envelope,
            refused.envelope_sha256,
            json.dumps(refused.capture, sort_keys=True),
            refused.refused_ms,
        ),
    )
    db.execute("DELETE FROM pending_contributions WHERE key_id = ? AND seq = ?", (refused.key_id, str(refused.seq)))


_REFUSED_SELECT = (
    "SELECT device, key_id, seq, run_id, round, node_id, reason, detail, flagged, envelope, envelope_sha256, capture,"
    " refused_ms FROM refused_contributions"
)


def _refused(row: tuple[Any, ...]) -> RefusedContribution:
    device, key_id, seq, run_id, rnd, node_id, reason, detail, flagged, envelope, digest, capture, refused_ms = row
    return RefusedContribution(
        device=str(device),
        key_id=str(key_id),
        seq=int(str(seq)),
        run_id=int(str(run_id)),
        round=int(str(rnd)),
        node_id=int(str(node_id)),
        reason=str(reason),
        detail=str(detail),
        flagged=bool(flagged),
        envelope=bytes(envelope),
        envelope_sha256=str(digest),
        capture=json.loads(str(capture)),
        refused_ms=int(str(refused_ms)),
    )


@dataclass(frozen=True)
class _Wait:
    """The report's round is not captured yet; `new` when it is not stored as waiting already (a resend is)."""

    new: bool


_WAIT, _STILL_WAITING = _Wait(new=True), _Wait(new=False)


class ContributionMetrics:
    """The gate's Prometheus series, in the service's registry (refusals are counted by reason by the service)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Counter(
            "midgate_contributions_held",
            "contribution reports stored to wait for their round's capture",
            registry=registry,
        )
        self.pending = Gauge(
            "midgate_contributions_pending", "contribution reports waiting for their round's capture", registry=registry
        )
        self.flagged = Counter(
            "midgate_devices_flagged", "reports whose signed update hash Flower did not deliver", registry=registry
        )


class ContributionGate:
    """Cross-checks contribution reports before the ledger; runs on the ingest pipeline's thread, one call at a time.

    Parameters
    ----------
    mid: the MID id (topics).
    mid_key: signs the Refusal notices.
    store: pending and refused reports.
    registry: node id of each device's Flower key (`flower_nodes`); read, never written.
    captures: the strategy's round captures.
    issued: the invitation nonces of the MID's jobs, by run id (the job book).
    grace_ms: how long a report waits for its round's capture before `round_not_captured`.
    poll_s: how often waiting reports are re-checked (`due`).
    in_ledger: (key id, seq) -> already logged (the dedup index): a crash between the ledger commit and the
        pending row's deletion must not log a report twice.
    metrics: the gate's series (None: not exported).
    """

    def __init__(
        self,
        *,
        mid: str,
        mid_key: SignerKey,
        store: ContributionStore,
        registry: Registry,
        captures: RoundCaptures,
        issued: IssuedNonces,
        grace_ms: int,
        poll_s: float,
        in_ledger: Callable[[str, int], bool],
        metrics: ContributionMetrics | None = None,
    ) -> None:
        self.mid = mid
        self.mid_key = mid_key
        self.store = store
        self.registry = registry
        self.captures = captures
        self.issued = issued
        self.grace_ms = grace_ms
        self.poll_s = poll_s
        self.in_ledger = in_ledger
        self.metrics = metrics
        self._nodes: dict[str, int] = {}
        self._registry_version = -1
        # In memory so that a new report costs no SQLite read; both are small (refusals are rare, and a report waits
        # only until its round is complete).
        self._waiting = store.pending_digests()
        self._refused = store.refused_keys()
        self._next_poll = 0.0
        self._publish_pending()

    @property
    def pending_count(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        self.store.close()
        self.registry.close()

    def due(self, now_monotonic: float) -> bool:
        """True when reports are waiting and `poll_s` passed since the last `resolve`."""
        return bool(self._waiting) and now_monotonic >= self._next_poll

    def admit(self, candidates: Sequence[Candidate], now_ms: int) -> Admission:
        """Sort a batch's ledger candidates; held and refused reports are committed here, before any ack."""
        admission = Admission()
        held: list[tuple[ReportedContribution, bytes]] = []
        refusals: list[RefusedContribution] = []
        self._refresh_nodes()
        for candidate in candidates:
            if candidate.leaf.kind is not LeafKind.CONTRIBUTION:
                admission.ready.append(candidate)
                continue
            v = candidate.verdict
            assert v.device is not None and v.key_id is not None and v.seq is not None
            report = reported_contribution(candidate.leaf.signed, v.device, v.key_id)
            refused = self._admit_one(report, candidate.digest, now_ms)
            if refused is None:
                admission.ready.append(candidate)
            elif isinstance(refused, _Wait):
                if refused.new:
                    held.append((report, candidate.digest))
                admission.held.append(v)
            else:
                if refused.reason != Reason.EQUIVOCATION:  # the waiting or refused original stays as it is
                    refusals.append(refused)
                self._refuse(v, refused, admission, now_ms)
        if held or refusals:
            with self.store.transaction() as db:
                for report, _ in held:
                    hold(db, report, now_ms)
                for refused in refusals:
                    record_refusal(db, refused)
            self._waiting.update(((r.key_id, r.message.seq), digest) for r, digest in held)
            self._forget_refused(refusals)
            if self.metrics is not None:
                self.metrics.held.inc(len(held))
            self._publish_pending()
        return admission

    def _admit_one(
        self, report: ReportedContribution, digest: bytes, now_ms: int
    ) -> RefusedContribution | _Wait | None:
        """None: matches its capture; _WAIT: waits for it; else the refusal (earlier refusals are repeated)."""
        slot = (report.key_id, report.message.seq)
        earlier = self.store.refusal(*slot) if slot in self._refused else None
        if earlier is not None:
            if earlier.envelope_sha256 == digest.hex():
                return earlier
            return self._refusal(report, EquivocationError("other bytes for a refused (key, seq)"), None, now_ms)
        waiting = self._waiting.get(slot)
        if waiting is not None:
            if waiting == digest:
                return _STILL_WAITING
            return self._refusal(report, EquivocationError("other bytes for a waiting (key, seq)"), None, now_ms)
        capture = self.captures.get(report.message.run_id, report.message.round)
        if capture is None:
            issued = self.issued.for_run(report.message.run_id)
            if issued is not None:  # no record yet: it may be late until the round is captured (`_judge`)
                try:
                    check_round_nonce(report.device, report.message.run_id, report.message.round_nonce, issued)
                except ProtocolError as exc:
                    return self._refusal(report, exc, None, now_ms)
            return _WAIT
        return self._judge(report, capture, now_ms)

    def _judge(self, report: ReportedContribution, capture: RoundCapture, now_ms: int) -> RefusedContribution | None:
        """The nonce of the signer's invitation (a run no job record names is refused by now), then the capture."""
        try:
            check_round_nonce(
                report.device,
                report.message.run_id,
                report.message.round_nonce,
                self.issued.for_run(report.message.run_id),
            )
            judge_report(report.message, capture, self._nodes.get(report.device))
        except ProtocolError as exc:
            return self._refusal(report, exc, capture, now_ms)
        return None

    def resolve(self, now_ms: int, limit: int = 1000) -> Admission:
        """Re-check waiting reports: those whose capture appeared become ledger candidates (`ready`; call `logged`
        after their commit) or refusals; those past the grace period are refused `round_not_captured`."""
        self._next_poll = time.monotonic() + self.poll_s
        self._refresh_nodes()
        admission = Admission()
        refusals: list[RefusedContribution] = []
        logged_already: list[ReportedContribution] = []
        for report, received_ms in self._resolvable(now_ms, limit):
            if self.in_ledger(report.key_id, report.message.seq):
                logged_already.append(report)
                continue
            capture = self.captures.get(report.message.run_id, report.message.round)
            if capture is None:
                if now_ms - received_ms < self.grace_ms:
                    continue
                expired = RoundNotCapturedError(
                    "no capture of this round within the grace period",
                    run_id=report.message.run_id,
                    round=report.message.round,
                    waited_ms=now_ms - received_ms,
                )
                refused: RefusedContribution | None = self._refusal(report, expired, None, now_ms)
            else:
                refused = self._judge(report, capture, now_ms)
            signer = self.registry.device(report.device)
            assert signer is not None  # devices are revoked, never deleted
            if refused is None and signer.revoked:
                # Screening refuses a revoked key; a report that waited across the revocation is refused the same.
                revoked = RevokedKeyError("device key was revoked while the report waited", device=report.device)
                refused = self._refusal(report, revoked, capture, now_ms)
            if refused is None:
                admission.ready.append(self._candidate(report, signer))
                continue
            refusals.append(refused)
            self._refuse(self._verdict(report), refused, admission, now_ms)
        if refusals or logged_already:
            with self.store.transaction() as db:
                for refused in refusals:
                    record_refusal(db, refused)
                _delete_pending(db, logged_already)
            self._forget_refused(refusals)
            for report in logged_already:
                self._waiting.pop((report.key_id, report.message.seq), None)
            self._publish_pending()
        return admission

    def _resolvable(self, now_ms: int, limit: int) -> list[tuple[ReportedContribution, int]]:
        """Waiting reports of the rounds now captured or past the grace period (at most `limit`), so that rounds
        still running never crowd out the ones that can be settled."""
        found: list[tuple[ReportedContribution, int]] = []
        for run_id, server_round, oldest_ms in self.store.pending_rounds():
            if len(found) >= limit:
                break
            if now_ms - oldest_ms < self.grace_ms and self.captures.get(run_id, server_round) is None:
                continue
            found += self.store.pending(run_id, server_round, limit - len(found))
        return found

    def logged(self, verdicts: Sequence[Verdict]) -> None:
        """The ledger committed these formerly waiting reports: forget them."""
        done = [(v.key_id, str(v.seq)) for v in verdicts if v.key_id is not None and v.seq is not None]
        if not done:
            return
        with self.store.transaction() as db:
            db.executemany("DELETE FROM pending_contributions WHERE key_id = ? AND seq = ?", done)
        for key_id, seq in done:
            self._waiting.pop((key_id, int(seq)), None)
        self._publish_pending()

    def _forget_refused(self, refusals: Sequence[RefusedContribution]) -> None:
        """After their rows are committed: refused reports wait no more, and a resend is answered from the row."""
        for refused in refusals:
            self._waiting.pop((refused.key_id, refused.seq), None)
            self._refused.add((refused.key_id, refused.seq))

    def _refresh_nodes(self) -> None:
        version = self.registry.version()
        if version == self._registry_version:
            return
        nodes = {}
        for device in self.registry.devices():
            node = self.registry.flower_node(device.device_id)
            if node is not None:
                nodes[device.device_id] = node.node_id
        self._nodes, self._registry_version = nodes, version

    def _refusal(
        self, report: ReportedContribution, exc: ProtocolError, capture: RoundCapture | None, now_ms: int
    ) -> RefusedContribution:
        flagged = exc.reason in FLAGGING_REASONS
        refused = RefusedContribution(
            device=report.device,
            key_id=report.key_id,
            seq=report.message.seq,
            run_id=report.message.run_id,
            round=report.message.round,
            node_id=report.message.node_id,
            reason=str(exc.reason),
            detail=str(exc)[:256],
            flagged=flagged,
            envelope=report.envelope,
            envelope_sha256=envelope_digest(report.envelope).hex(),
            capture={
                **capture_evidence(capture, report.message.node_id),
                "reported_update_sha256": report.message.update_sha256,
                "reported_gradient_sha256": report.message.gradient_sha256,
                "reported_drift_offset_sha256": report.message.drift_offset_sha256,
            },
            refused_ms=now_ms,
        )
        if flagged:
            if self.metrics is not None:
                self.metrics.flagged.inc()
            log.warning(
                "device flagged: its signed report names an update Flower did not deliver",
                extra={
                    "device": report.device,
                    "seq": report.message.seq,
                    "run_id": report.message.run_id,
                    "round": report.message.round,
                    "error": refused.detail,
                },
            )
        return refused

    def _refuse(self, verdict: Verdict, refused: RefusedContribution, admission: Admission, now_ms: int) -> None:
        verdict.outcome, verdict.reason, verdict.error = Outcome.REJECTED, Reason(refused.reason), refused.detail
        admission.refused.append(verdict)
        admission.notices.append(self.refusal_notice(refused, now_ms))

    def refusal_notice(self, refused: RefusedContribution, now_ms: int) -> tuple[str, bytes]:
        """The MID-signed Refusal for `refused`, on its device's `down/refusal` topic."""
        notice = Refusal(
            device_key_id=refused.key_id,
            seq=refused.seq,
            envelope_sha256=refused.envelope_sha256,
            reason=refused.reason,
            detail=refused.detail,
            issued_ms=now_ms,
        )
        return down_topic(self.mid, refused.device, DownKind.REFUSAL), notice.seal(self.mid_key)

    def _verdict(self, report: ReportedContribution) -> Verdict:
        # Acknowledged when it was held; received now as far as the latency histogram is concerned.
        inbound = InboundMessage(
            up_topic(self.mid, report.device, UpKind.REPORT), report.envelope, None, time.monotonic_ns()
        )
        return Verdict(inbound, Outcome.REJECTED, device=report.device, key_id=report.key_id, seq=report.message.seq)

    def _candidate(self, report: ReportedContribution, signer: Device) -> Candidate:
        leaf = Leaf(LeafKind.CONTRIBUTION, report.envelope)
        return Candidate(self._verdict(report), signer, leaf, envelope_digest(report.envelope))

    def _publish_pending(self) -> None:
        if self.metrics is not None:
            self.metrics.pending.set(len(self._waiting))


def _delete_pending(db: sqlite3.Connection, reports: Sequence[ReportedContribution]) -> None:
    db.executemany(
        "DELETE FROM pending_contributions WHERE key_id = ? AND seq = ?",
        [(r.key_id, str(r.message.seq)) for r in reports],
    )


def open_contribution_gate(
    *,
    mid: str,
    mid_key: SignerKey,
    store_path: Path,
    registry: Registry,
    jobs_dir: Path,
    job_book_dir: Path,
    grace_s: float,
    poll_s: float,
    in_ledger: Callable[[str, int], bool],
    metrics_registry: CollectorRegistry | None = None,
) -> ContributionGate:
    """The gate `serve` runs with `[federation] enabled` (its own store file); `jobs_dir` holds the round captures,
    `job_book_dir` the job records with their invitation nonces."""
    metrics = ContributionMetrics(metrics_registry) if metrics_registry is not None else None
    return ContributionGate(
        mid=mid,
        mid_key=mid_key,
        store=ContributionStore(store_path),
        registry=registry,
        captures=RoundCaptures(jobs_dir),
        issued=IssuedNonces(job_book_dir),
        grace_ms=int(grace_s * 1000),
        poll_s=poll_s,
        in_ledger=in_ledger,
        metrics=metrics,
    )
