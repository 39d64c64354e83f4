"""How `serve` runs a buyer's job: the federation's own `JobRun` (what `midgate coordinator job start` runs), in the
desk's worker thread, against the SuperLink `serve` itself started, recording into the same job book, so `serve`'s
JobLedger logs and settles it as it does an operator's job."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path

from coordinator.capture.directory import read_validation
from coordinator.config import CoordinatorSettings
from coordinator.federation.control_api import ControlApi, RunControlError
from coordinator.federation.job_start import APP_DIR, InvitationSender, JobBook, JobRecord, JobRequest, JobRun
from coordinator.federation.mid_superlink import job_broker_login, job_control_api
from coordinator.market.models import Progress
from coordinator.policy.document import StrikePolicy
from coordinator.policy.ledger_records import PolicyLog
from coordinator.provenance.issue import issue_manifest
from coordinator.provenance.shelf import ManifestShelf
from coordinator.registry.store import Registry
from protocol.identity import SignerKey
from protocol.tasks.spec import TaskSpec

MODEL_FILE = "final-model.npz"


class ServeManifests:
    """Issues a delivered job's provenance manifest inside `serve`, with the same `issue_manifest` as `coordinator
    job manifest` and `job settle` (coordinator/provenance/issue.py): one manifest per job, kept, the same bytes
    whoever asks."""

    def __init__(self, settings: CoordinatorSettings, mid_key: SignerKey) -> None:
        self.settings = settings
        self.shelf = ManifestShelf(settings.manifests_dir, mid_key.verifier)

    def get(self, job_id: str) -> bytes | None:
        return self.shelf.get(job_id)

    def issue(self, job_id: str) -> bytes:
        return issue_manifest(self.settings, job_id)


class FlowerJobLauncher:
    """Runs buyer jobs on the MID's SuperLink (coordinator.market.desk.JobLauncher)."""

    def __init__(self, settings: CoordinatorSettings, mid_key: SignerKey, policies: PolicyLog | None = None) -> None:
        self.settings = settings
        self.mid_key = mid_key
        self.policies = policies
        self.book = JobBook(settings.job_book_dir)
        self._controls: dict[str, ControlApi] = {}
        self._lock = threading.Lock()
        # Progress is what buyers poll: parsed once per change of the job's record, not once per request.
        self._progress: dict[str, tuple[tuple[int, int, int], Progress]] = {}

    def run(self, request: JobRequest, spec: TaskSpec, report: Callable[[str], None]) -> JobRecord:
        s = self.settings
        login = job_broker_login(s, request.job_id)
        control = job_control_api(s)
        control.prepare(APP_DIR)  # Flower's imports and the FAB, while the broker connects and the devices are invited
        with self._lock:
            self._controls[request.job_id] = control
        current = self.policies.current() if self.policies is not None else None
        strikes = current.record.policy.strikes if current is not None else StrikePolicy()
        registry = Registry(s.registry_path)
        try:
            with InvitationSender(login) as sender:
                return JobRun(
                    request=request,
                    registry=registry,
                    mid_key=self.mid_key,
                    mid=s.mid,
                    control=control,
                    sender=sender,
                    jobs_dir=s.jobs_dir,
                    book=self.book,
                    report=report,
                    offline_after_s=s.ingest.heartbeat_offline_s,
                    flower_acceleration=s.federation.flower_acceleration,
                    task=spec,
                    strike_quorum_bps=strikes.quorum_bps,
                    strike_min_members=strikes.min_members,
                    strike_stops_running=strikes.running_jobs == "stop",
                ).run()
        finally:
            registry.close()
            with self._lock:
                self._controls.pop(request.job_id, None)
            control.close()

    def stop(self, job_id: str) -> None:
        """Stop the job's run on the SuperLink (JobRun then ends it failed); nothing when it has no run yet."""
        with self._lock:
            control = self._controls.get(job_id)
        record = self.book.read(job_id)
        if control is not None and record is not None and record.run_id is not None:
            with contextlib.suppress(RunControlError, OSError):
                control.stop_run(record.run_id)

    def progress(self, job_id: str) -> Progress | None:
        """The job's progress from its record in the job book, re-read only when the record's file changed (the book
        replaces it on every write) or while the last round's validation metrics are not written yet."""
        try:
            stat = self.book.path(job_id).stat()
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._progress.get(job_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        found = self._read_progress(job_id)
        if found is not None and (found.round == 0 or found.metrics):
            with self._lock:
                if len(self._progress) > 1024:
                    self._progress.clear()
                self._progress[job_id] = (key, found)
        return found

    def _read_progress(self, job_id: str) -> Progress | None:
        record = self.book.read(job_id)
        if record is None:
            return None
        metrics: dict[str, float] = {}
        if record.run_id is not None and record.rounds_completed > 0:
            scored = read_validation(self.run_dir(record), record.rounds_completed)
            if scored is not None:
                metrics = scored[0]
        if record.outcome is not None and record.outcome.final_validation:
            metrics = dict(record.outcome.final_validation)
        return Progress(
            round=record.rounds_completed,
            rounds=record.request.rounds,
            members=sorted({d.member_id for d in record.invited}),
            devices=[d.device_id for d in record.invited],
            accuracy=metrics.get("accuracy"),
            metrics=metrics,
            run_id=record.run_id,
        )

    def run_dir(self, record: JobRecord) -> Path:
        return self.settings.jobs_dir / f"run-{record.run_id}"

    def model_path(self, record: JobRecord) -> Path:
        return self.run_dir(record) / MODEL_FILE
