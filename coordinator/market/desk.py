"""A buyer job from request to delivered model: the states, the money in the ledger, the worker that runs the job.

    requested --quote--> quoted --accept (ESCROW leaf)--> accepted --> running --> settling --> delivered
         |                  |                                  |            |          (SETTLEMENT, ESCROW_RELEASE)
         +---- cancel ------+--> cancelled                     +---- fail or cancel --> failed (REFUND leaf)

- **request** stores what the buyer asked for (idempotent by the buyer's `Idempotency-Key`);
- **validation data** (`PUT .../validation`) is the buyer's window file for the task, checked against the spec;
- **quote** is refused with reason `strike` while a strike at the policy's quorum covers the buyer or purpose
  (coordinator.registry.strikes); it picks the eligible members (enrolled devices with a Flower node whose members
  are not paused, striking against this buyer or purpose, gone or offline: coordinator.registry.presence.absence,
  and whose logged consent allows the buyer and purpose), at most `max_members` of them, and prices them with
  coordinator.royalties.quote.quote_job at their latest logged knobs (the default knob 0 for a member who never set
  one) under the MID's royalty policy;
- **accept** takes the quote's total into escrow: an ESCROW leaf holding the buyer's signed accept request;
- the worker thread runs the job on serve's SuperLink with the federation's own `JobRun` (the `JobLauncher`), then
  records the escrowed amount as the job's payment in the job book, where serve's `JobLedger` settles it under the
  MID's policy (the SETTLEMENT leaf); the escrow is then released into it (ESCROW_RELEASE leaf naming that leaf);
- a job that fails (or is cancelled, or finds the coordinator restarted under it) has its escrow refunded (REFUND).

A buyer sees only its own jobs: another buyer's job id is `unknown_job`, the same answer as an id never issued.
Blocking (SQLite, threads): async callers use asyncio.to_thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import ValidationError

from coordinator.federation.control_api import RunControlError
from coordinator.federation.job_ledger import is_job_leaf, is_settlement_leaf
from coordinator.federation.job_start import JobBook, JobPayment, JobRecord, JobRequest, JobRequestError
from coordinator.ledger.store import LedgerStore
from coordinator.market.models import (
    TERMINAL,
    AcceptBody,
    Escrow,
    JobQuote,
    JobRequestBody,
    JobState,
    MarketJob,
    Progress,
)
from coordinator.market.store import MarketStore
from coordinator.policy.document import StrikePolicy
from coordinator.policy.ledger_records import PolicyLog
from coordinator.policy.reputation import LoggedReputation, below_minimum
from coordinator.registry.member_choices import knobs_for
from coordinator.registry.presence import absence, active_strikes
from coordinator.registry.store import Registry
from coordinator.registry.strikes import refuse_if_struck
from coordinator.royalties.policy import RoyaltyPolicy
from coordinator.royalties.quote import quote_job
from coordinator.tasks.catalogue import TaskCatalogue
from protocol.buyer_request import SignedRequest
from protocol.errors import (
    IdempotencyMismatchError,
    JobStateError,
    MalformedError,
    PolicyViolationError,
    ProtocolError,
    TooLargeError,
    UnknownJobError,
)
from protocol.escrow import EscrowEvent, EscrowRecord
from protocol.leaves import Leaf, decode_leaf
from protocol.messages import usable_sensors
from protocol.settings import validation_problems
from protocol.tasks.spec import MAX_TASK_SPEC_BYTES, TaskSpec, UnknownTaskError, parse_task_spec
from protocol.tasks.windows import load_window_file

log = logging.getLogger("midgate.market")

MAX_REQUEST_BYTES = 16 * 1024
MAX_JOB_REQUEST_BYTES = MAX_REQUEST_BYTES + 2 * MAX_TASK_SPEC_BYTES
"""`POST /v1/jobs`: room for a proposed task spec (its JSON may be spelled larger than its canonical form)."""


class JobLauncher(Protocol):
    """Runs a job to its end on the MID's SuperLink (coordinator/market/runner.py) and reads its progress."""

    book: JobBook

    def run(self, request: JobRequest, spec: TaskSpec, report: Callable[[str], None]) -> JobRecord: ...

    def stop(self, job_id: str) -> None: ...

    def progress(self, job_id: str) -> Progress | None: ...

    def model_path(self, record: JobRecord) -> Path: ...


class ManifestIssuer(Protocol):
    """Issues a settled job's signed provenance manifest once and keeps it (coordinator/market/runner.py)."""

    def issue(self, job_id: str) -> bytes: ...

    def get(self, job_id: str) -> bytes | None: ...


@dataclass(frozen=True)
class MarketTerms:
    """The MID's terms for buyer jobs (`[market]` and `[royalties]` of its config).

    currency, policy: what quotes are priced in and under. quote_ttl_s: how long a quote can be accepted.
    max_validation_bytes: the largest validation upload. validation_dir: where uploads are kept.
    dp_clipping_norm, dp_noise_multiplier: the DP a `dp_required` job trains with.
    join_timeout_s, round_timeout_s: the job's Flower waits. offline_after_s: a device not heard from for this long
    is not quoted. settle_timeout_s: after this long without its settlement a completed job's status says it is late.
    """

    currency: str
    policy: RoyaltyPolicy
    validation_dir: Path
    quote_ttl_s: float = 900.0
    max_validation_bytes: int = 8 * 1024 * 1024
    dp_clipping_norm: float = 1.0
    dp_noise_multiplier: float = 0.5
    join_timeout_s: float = 60.0
    round_timeout_s: float = 120.0
    offline_after_s: float = 180.0
    settle_timeout_s: float = 300.0


class JobDesk:
    """The buyer jobs of one MID (module docstring). `close()` stops the workers: a job still running fails."""

    def __init__(
        self,
        store: MarketStore,
        catalogue: TaskCatalogue,
        registry: Registry,
        ledger: LedgerStore,
        terms: MarketTerms,
        launcher: JobLauncher | None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        policies: PolicyLog | None = None,
        manifests: ManifestIssuer | None = None,
    ) -> None:
        self.store = store
        self.catalogue = catalogue
        self.registry = registry
        self.ledger = ledger
        self.terms = terms
        self.launcher = launcher
        self.clock_ms = clock_ms
        self.policies = policies
        self.manifests = manifests
        self._lock = threading.RLock()  # every read-modify-write of a job document
        self._stopping = threading.Event()
        self._workers: dict[str, threading.Thread] = {}
        self._reputation = LoggedReputation(ledger)

    # The steps a buyer takes

    def request(self, buyer: str, body: bytes, idempotency_key: str | None) -> tuple[MarketJob, bool]:
        """Store a job request; (the job, True) when created, (the job first created under this key, False) for a
        repeat. The same key with another body is refused `idempotency_mismatch`."""
        if len(body) > MAX_JOB_REQUEST_BYTES:
            raise TooLargeError("job request too large", limit=MAX_JOB_REQUEST_BYTES, found=len(body))
        request = _parse(JobRequestBody, body)
        spec = self._requested_spec(request)
        current = self.policies.current() if self.policies is not None else None
        if current is not None:
            current.policy.purpose(request.purpose)  # policy_violation: not in the MID's purpose vocabulary
        if request.rounds is None:
            request = request.model_copy(update={"rounds": spec.recipe.rounds})
        now = self.clock_ms()
        job = MarketJob(
            job_id=f"job-{secrets.token_hex(6)}",
            buyer=buyer,
            created_ms=now,
            updated_ms=now,
            request=request,
            task_proposed=request.task_spec is not None,
        )
        digest = hashlib.sha256(body).hexdigest()
        earlier = self.store.insert_job(job.job_id, buyer, idempotency_key, digest, job.model_dump_json(), now)
        if earlier is None:
            log.info("job requested", extra={"job": job.job_id, "buyer": buyer, "task": request.task})
            return job, True
        if earlier[1] != digest:
            raise IdempotencyMismatchError("this Idempotency-Key was used for another request", job=earlier[0])
        return self.view(buyer, earlier[0]), False

    def upload_validation(self, buyer: str, job_id: str, data: bytes) -> MarketJob:
        """Keep the buyer's validation windows for the job (before it is accepted); refused when they do not fit the
        task's spec."""
        if len(data) > self.terms.max_validation_bytes:
            raise TooLargeError("validation data too large", limit=self.terms.max_validation_bytes, found=len(data))
        with self._lock:
            job = self._own(buyer, job_id)
            _require(job, ("requested", "quoted"), "validation data is set before the job is accepted")
            spec = self._job_spec(job)
            path = self.validation_path(job_id)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            tmp.write_bytes(data)
            tmp.chmod(0o600)
            try:
                load_window_file(tmp, spec)
            except ProtocolError:
                tmp.unlink()
                raise
            tmp.replace(path)
            job.validation_sha256 = hashlib.sha256(data).hexdigest()
            job.validation_bytes = len(data)
            return self._save(job, job.state)

    def quote(self, buyer: str, job_id: str) -> MarketJob:
        """Price the job with the members eligible now; a later quote replaces an earlier one not yet accepted."""
        with self._lock:
            job = self._own(buyer, job_id)
            _require(job, ("requested", "quoted"), "a job is quoted before it is accepted")
            self._approved(job)
            now = self.clock_ms()
            strikes = self._strikes()
            refuse_if_struck(self.registry, buyer, job.request.purpose, strikes.quorum_bps, now, strikes.min_members)
            spec = self._job_spec(job)
            devices = self._eligible(
                buyer, job.request.purpose, now, (spec.id, usable_sensors([i.sources for i in spec.inputs]))
            )
            devices, below = self._reputable(devices, job.request.purpose)
            members = sorted({member for _, member in devices})[: job.request.max_members]
            if len(members) < job.request.min_members:
                why = f" ({below} below the policy's minimum reputation for a '{job.request.purpose}' job)"
                raise JobStateError(
                    "too few eligible members for this job now" + (why if below else ""),
                    expected=f">= {job.request.min_members}",
                    found=len(members),
                )
            policy = self._policy()
            priced = quote_job(knobs_for(members, self.registry.knobs()), policy)
            job.quote = JobQuote(
                job_id=job_id,
                members=members,
                devices=sorted(device for device, member in devices if member in members),
                member_prices=priced.member_prices,
                members_minor=priced.members_minor,
                fee_minor=priced.fee_minor,
                total_minor=priced.total_minor,
                currency=self.terms.currency,
                policy_version=priced.policy_version,
                fee_bps=policy.fee_bps,
                issued_ms=now,
                expires_ms=now + int(self.terms.quote_ttl_s * 1000),
            )
            job.quote_sha256 = job.quote.sha256()
            return self._save(job, "quoted")

    def accept(self, buyer: str, job_id: str, body: bytes, signed: SignedRequest) -> MarketJob:
        """Take the quoted total into escrow (an ESCROW leaf with the buyer's signed request) and start the job.
        Accepting the same quote again answers the job as it is."""
        accept = _parse(AcceptBody, body)
        with self._lock:
            job = self._own(buyer, job_id)
            if job.escrow is not None and job.escrow.quote_sha256 == accept.quote_sha256:
                return self._with_progress(job)
            _require(job, ("quoted",), "only a quoted job is accepted")
            assert job.quote is not None and job.quote_sha256 is not None
            if accept.quote_sha256 != job.quote_sha256:
                raise JobStateError("not the job's current quote", expected=job.quote_sha256, found=accept.quote_sha256)
            if accept.amount_minor != job.quote.total_minor:
                raise PolicyViolationError(
                    "the payment is not the quoted total", expected=job.quote.total_minor, found=accept.amount_minor
                )
            now = self.clock_ms()
            if now > job.quote.expires_ms:
                raise JobStateError("the quote expired: ask for a new one", expires_ms=job.quote.expires_ms)
            if job.validation_sha256 is None:
                raise JobStateError("upload validation data first (PUT /v1/jobs/{job_id}/validation)")
            if self.launcher is None:
                raise PolicyViolationError("this MID runs no jobs: [federation] enabled = false")
            record = EscrowRecord(
                event="deposit",
                job_id=job_id,
                buyer=buyer,
                amount_minor=accept.amount_minor,
                currency=job.quote.currency,
                quote_sha256=job.quote_sha256,
                created_ms=now,
                authorisation=signed.envelope.decode("ascii"),
                authorised_body=body.decode("utf-8"),
            )
            index = self._append(record)
            job.escrow = Escrow(
                amount_minor=accept.amount_minor, currency=record.currency, quote_sha256=job.quote_sha256, index=index
            )
            job.ledger.escrow = index
            job = self._save(job, "accepted")
            log.info("job accepted", extra={"job": job_id, "buyer": buyer, "escrow_leaf": index})
            self._start_worker(job_id)
            return job

    def cancel(self, buyer: str, job_id: str) -> MarketJob:
        """Before acceptance the job is dropped; after it, its run is stopped and the escrow refunded."""
        with self._lock:
            job = self._own(buyer, job_id)
            _require(job, ("requested", "quoted", "accepted", "running"), "the job has ended or is being settled")
            if job.state in ("requested", "quoted"):
                job.reason = "cancelled by the buyer"
                return self._save(job, "cancelled")
            job.cancel_requested = True
            job = self._save(job, job.state)
        if self.launcher is not None:
            self.launcher.stop(job_id)
        return job

    def view(self, buyer: str, job_id: str) -> MarketJob:
        return self._with_progress(self._own(buyer, job_id))

    def jobs(self, buyer: str) -> list[MarketJob]:
        return [self.view(buyer, job_id) for job_id in self.store.job_ids(buyer)]

    def model_file(self, buyer: str, job_id: str) -> Path:
        job = self._own(buyer, job_id)
        _require(job, ("delivered",), "the model is downloaded once the job is delivered")
        assert self.launcher is not None
        record = self.launcher.book.read(job_id)
        path = None if record is None else self.launcher.model_path(record)
        if path is None or not path.is_file():
            raise JobStateError("the delivered model's file is gone from the coordinator", job=job_id)
        return path

    def validation_path(self, job_id: str) -> Path:
        return self.terms.validation_dir / f"{job_id}.npz"

    # Lifetime

    def recover(self) -> None:
        """At start: a job that was accepted or running when the coordinator stopped has lost its run: it fails and
        is refunded. One that was settling waits for its settlement again."""
        for job_id in self.store.job_ids(states=("accepted", "running")):
            self._fail(job_id, "the coordinator restarted while the job ran")
        for job_id in self.store.job_ids(states=("settling",)):
            self._start_worker(job_id, settle_only=True)

    def close(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        with self._lock:
            workers = dict(self._workers)
        for job_id in workers:
            if self.launcher is not None:
                self.launcher.stop(job_id)
        for thread in workers.values():
            thread.join(timeout_s)

    # The worker

    def _start_worker(self, job_id: str, settle_only: bool = False) -> None:
        thread = threading.Thread(target=self._work, args=(job_id, settle_only), name=f"market-{job_id}", daemon=True)
        with self._lock:
            self._workers[job_id] = thread
        thread.start()

    def _work(self, job_id: str, settle_only: bool) -> None:
        try:
            if settle_only:
                self._settle(job_id)
            else:
                self._run(job_id)
        except Exception as error:  # the worker's end must be a state the buyer sees, never a silent thread death
            log.exception("buyer job worker failed", extra={"job": job_id})
            self._fail(job_id, f"internal: {type(error).__name__}: {str(error)[:200]}")
        finally:
            with self._lock:
                self._workers.pop(job_id, None)

    def _run(self, job_id: str) -> None:
        assert self.launcher is not None
        with self._lock:
            job = self._stored(job_id)
            if job.cancel_requested or self._stopping.is_set():
                self._fail(job_id, "cancelled by the buyer" if job.cancel_requested else "the coordinator stopped")
                return
            self._save(job, "running")
        assert job.quote is not None
        spec = self.catalogue.get(job.request.task_id, job.request.task_version).spec
        try:
            request = JobRequest.model_validate(
                {
                    "job_id": job_id,
                    "task_id": job.request.task_id,
                    "task_version": job.request.task_version,
                    "rounds": job.request.rounds,
                    "devices": tuple(job.quote.devices),
                    "min_nodes": min(job.request.min_members, len(job.quote.devices)),
                    "round_timeout_s": self.terms.round_timeout_s,
                    "join_timeout_s": self.terms.join_timeout_s,
                    "validation_path": self.validation_path(job_id),
                    "purpose": job.request.purpose,
                    "buyer": job.buyer,
                    "dp_clipping_norm": self.terms.dp_clipping_norm if job.request.dp_required else 0.0,
                    "dp_noise_multiplier": self.terms.dp_noise_multiplier if job.request.dp_required else 0.0,
                },
                context={"task": spec},
            )
            record = self.launcher.run(request, spec, lambda line: self._report(job_id, line))
        except (ProtocolError, ValidationError, OSError, RuntimeError, JobRequestError, RunControlError) as error:
            self._fail(job_id, _reason(error))
            return
        with self._lock:
            job = self._stored(job_id)
            if job.cancel_requested:  # also when the stop came too late to end the run: the buyer does not pay
                self._fail(job_id, "cancelled by the buyer")
                return
            if record.status != "completed" or record.model_version is None:
                self._fail(job_id, f"the run failed: {record.reason}")
                return
            assert job.escrow is not None and record.outcome is not None
            escrow = job.escrow
            job.model_version = record.model_version
            job.model_sha256 = record.outcome.final_model_sha256
            self._save(job, "settling")
        # serve's JobLedger logs the job, then settles this payment under the MID's policy (the SETTLEMENT leaf).
        self.launcher.book.record_payment(
            JobPayment(
                job_id=job_id,
                payment_minor=escrow.amount_minor,
                currency=escrow.currency,
                recorded_ms=self.clock_ms(),
            )
        )
        self._settle(job_id)

    def _report(self, job_id: str, line: str) -> None:
        """A line of the run's progress; a cancel asked before the run had an id to stop is carried out now."""
        log.info(line, extra={"job": job_id})
        if self.launcher is not None and self._stored(job_id).cancel_requested:
            self.launcher.stop(job_id)

    def _settle(self, job_id: str) -> None:
        """Wait for the SETTLEMENT leaf serve appends for the job, then release the escrow into it."""
        deadline: float | None = time.monotonic() + self.terms.settle_timeout_s
        settled: int | None = None
        logged: int | None = None
        start = 0
        match_job, match_settlement = is_job_leaf(job_id), is_settlement_leaf(job_id)
        while settled is None:
            size = self.ledger.size
            for index, data in self.ledger.leaves(start, size):
                leaf = decode_leaf(data)
                if logged is None and match_job(leaf):
                    logged = index
                elif match_settlement(leaf):
                    settled = index
            start = size
            if settled is not None:
                break
            stopping = self._stopping.wait(0.25)
            if stopping or (deadline is not None and time.monotonic() > deadline):
                deadline = None  # said once; the wait goes on until serve stops (and resumes at its next start)
                with self._lock:
                    job = self._stored(job_id)
                    job.reason = "not settled yet: serve settles the recorded payment (its log says why it did not)"
                    job.ledger.job = logged
                    self._save(job, "settling")
                if stopping:
                    return
        with self._lock:
            job = self._stored(job_id)
            assert job.escrow is not None
            release = self._moved(job, "release", settlement_record_id=f"settlement-{job_id}", settlement_index=settled)
            job.ledger.job, job.ledger.settlement = logged, settled
            job.ledger.release = self._append(release)
            job.reason = ""
            self._save(job, "settling")
        manifest, why = self._issue_manifest(job_id)
        with self._lock:
            job = self._stored(job_id)
            job.manifest, job.reason = manifest, why
            self._save(job, "delivered")
        log.info("job delivered", extra={"job": job_id, "settlement_leaf": settled, "manifest": manifest})

    def _issue_manifest(self, job_id: str) -> tuple[bool, str]:
        """(issued, why not): a delivered job without a manifest still has its model and settlement."""
        if self.manifests is None:
            return False, "no manifest: this coordinator issues none"
        try:
            self.manifests.issue(job_id)
        except (ProtocolError, OSError) as error:
            log.error("manifest not issued", extra={"job": job_id, "reason": _reason(error)})
            return False, f"no manifest: {_reason(error)}"[:256]
        return True, ""

    def manifest(self, buyer: str, job_id: str) -> bytes:
        job = self._own(buyer, job_id)
        _require(job, ("delivered",), "the manifest is issued once the job is delivered")
        found = self.manifests.get(job_id) if self.manifests is not None else None
        if found is None:
            raise JobStateError("the job was delivered without a manifest", job=job_id, reason=job.reason)
        return found

    def _fail(self, job_id: str, reason: str) -> None:
        """End the job failed; escrow held for it goes back to the buyer (REFUND leaf)."""
        with self._lock:
            job = self._stored(job_id)
            if job.state in TERMINAL:
                return
            job.reason = reason[:256]
            if job.escrow is not None and job.ledger.refund is None:
                job.ledger.refund = self._append(self._moved(job, "refund", reason=job.reason))
            self._save(job, "failed")
        log.warning("job failed", extra={"job": job_id, "reason": reason[:256]})

    # Storage helpers

    def _policy(self) -> RoyaltyPolicy:
        """The policy a quote made now is priced under: the latest POLICY leaf's, else the configured one."""
        current = self.policies.current() if self.policies is not None else None
        return current.royalty() if current is not None else self.terms.policy

    def _requested_spec(self, request: JobRequestBody) -> TaskSpec:
        """The task a request names: the catalogue's; or, for a request that proposes its task, the proposed spec,
        checked as `coordinator task add` checks one (and refused when the catalogue has another under its name)."""
        if request.task_spec is None:
            return self.catalogue.get(request.task_id, request.task_version).spec
        proposed = parse_task_spec(json.dumps(request.task_spec).encode())
        if proposed.key != request.task:
            raise MalformedError("the proposed task spec is not the task the request names", found=proposed.key)
        try:
            kept = self.catalogue.get(request.task_id, request.task_version).spec
        except UnknownTaskError:
            return proposed
        if kept.canonical_json() != proposed.canonical_json():
            raise PolicyViolationError("the MID has another task under this id@version", task=request.task)
        return kept

    def _job_spec(self, job: MarketJob) -> TaskSpec:
        """The job's task: the catalogue's, or the one its request proposed while it awaits approval."""
        try:
            return self.catalogue.get(job.request.task_id, job.request.task_version).spec
        except UnknownTaskError:
            if job.request.task_spec is None:
                raise
            return parse_task_spec(json.dumps(job.request.task_spec).encode())

    def _approved(self, job: MarketJob) -> None:
        """Refuse `job_state` while the task the job proposed is not in the catalogue (approved by the operator)."""
        if job.task_proposed:
            try:
                self.catalogue.get(job.request.task_id, job.request.task_version)
            except UnknownTaskError:
                raise JobStateError(
                    "the task this job proposed awaits the operator's approval", job=job.job_id, task=job.request.task
                ) from None

    def proposed_spec(self, job_id: str) -> TaskSpec:
        """The task spec a job's request proposed (`midgate coordinator task approve JOB`)."""
        job = self._stored(job_id)
        if job.request.task_spec is None:
            raise UnknownTaskError("this job proposed no task", job=job_id)
        return parse_task_spec(json.dumps(job.request.task_spec).encode())

    def _reputable(self, devices: list[tuple[str, str]], purpose: str) -> tuple[list[tuple[str, str]], int]:
        """The devices whose member meets the policy's minimum reputation for the job's class, its purpose
        (coordinator.policy.reputation.below_minimum, as `job start` selects), and how many members fell below."""
        current = self.policies.current() if self.policies is not None else None
        policy = current.record.policy if current is not None else None
        below = below_minimum(policy, purpose, (member for _, member in devices), self._reputation.scores)
        return [(d, m) for d, m in devices if m not in below], len(below)

    def _strikes(self) -> StrikePolicy:
        """The strike quorum a quote made now honours: the latest POLICY leaf's, else the policy's default."""
        current = self.policies.current() if self.policies is not None else None
        return current.record.policy.strikes if current is not None else StrikePolicy()

    def _moved(self, job: MarketJob, event: EscrowEvent, **details: object) -> EscrowRecord:
        """The record of the job's escrowed amount leaving escrow (`release` or `refund`), made now."""
        assert job.escrow is not None
        return EscrowRecord.model_validate(
            {
                "event": event,
                "job_id": job.job_id,
                "buyer": job.buyer,
                "amount_minor": job.escrow.amount_minor,
                "currency": job.escrow.currency,
                "quote_sha256": job.escrow.quote_sha256,
                "created_ms": self.clock_ms(),
                **details,
            }
        )

    def _append(self, record: EscrowRecord) -> int:
        return self.ledger.append_leaves([Leaf(record.kind, record.canonical_json())]).first_index

    def _stored(self, job_id: str) -> MarketJob:
        found = self.store.job_doc(job_id)
        if found is None:
            raise UnknownJobError("no such job", job=job_id)
        return MarketJob.model_validate_json(found[1])

    def _own(self, buyer: str, job_id: str) -> MarketJob:
        found = self.store.job_doc(job_id)
        if found is None or found[0] != buyer:
            # Another buyer's job is answered as one never issued: its existence is not the caller's to learn.
            raise UnknownJobError("no such job of this buyer", job=job_id[:80])
        return MarketJob.model_validate_json(found[1])

    def _save(self, job: MarketJob, state: JobState) -> MarketJob:
        job.state = state
        job.updated_ms = self.clock_ms()
        self.store.update_job(job.job_id, state, job.model_dump_json(), job.updated_ms)
        return job

    def _with_progress(self, job: MarketJob) -> MarketJob:
        if self.launcher is not None and job.state not in ("requested", "quoted", "cancelled"):
            progress = self.launcher.progress(job.job_id)
            if progress is not None:
                job = job.model_copy(update={"progress": progress})
        return job

    def _eligible(
        self, buyer: str, purpose: str, now_ms: int, task: tuple[str, tuple[str, ...]] | None = None
    ) -> list[tuple[str, str]]:
        """(device, member) of every device that could train a job of `buyer` for `purpose` now; with `task` (its id
        and the kinds of sensor its inputs take), only members whose consent gives it a sensor."""
        heard = self.registry.presence()
        striking = active_strikes(self.registry.strike_votes(), now_ms)
        consents = self.registry.consents()
        offline_after_ms = int(self.terms.offline_after_s * 1000)
        found = []
        for device in self.registry.devices():
            if device.revoked or self.registry.flower_node(device.device_id) is None:
                continue
            why = absence(
                heard.get(device.device_id),
                striking.get(device.device_id, []),
                buyer,
                purpose,
                now_ms,
                offline_after_ms,
            )
            consent = consents.get(device.member_id)
            if why is None and consent is not None:
                why = consent.excludes(buyer, purpose) if task is None else consent.excludes(buyer, purpose, *task)
            if why is None:
                found.append((device.device_id, device.member_id))
        return found


def _require(job: MarketJob, states: tuple[JobState, ...], why: str) -> None:
    if job.state not in states:
        raise JobStateError(why, job=job.job_id, state=job.state, expected=list(states))


M = TypeVar("M", JobRequestBody, AcceptBody)


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise MalformedError(f"invalid {model.__name__}: {validation_problems(error)}"[:900]) from None


def _reason(error: Exception) -> str:
    return " ".join(str(error).split())[:256] or type(error).__name__
