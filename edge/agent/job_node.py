"""The device's SuperNode lives only while the MID runs a job this member takes part in.

A `RoundInvitation` on the device's own `down/invite` topic, signed by the MID key, announces a job round (see
docs/federated.md). The first invitation of a job starts a SuperNodeSupervisor (edge.federated.supervisor) with the
device's Flower key from enrolment; later invitations of the same job extend its `deadline_ms`. The node is stopped,
with everything below it, when the deadline passes without a further invitation (the job ended) or the agent stops.
Between jobs no Flower process runs; with Flower acceleration and `keep_warm_executor` (agent.toml, default true) the
agent keeps one warm executor per membership from its start (edge.federated.acceleration.warm_executor: a parent
that imported torch, Flower and the ClientApp, runs none of them and connects nowhere), so that a job's SuperNode is
forked at once rather than after 6 s of imports per device (BENCHMARKS.md, "A job's time outside its rounds").

The member's choices gate every job (`admit`, edge.agent.controls.decisions): an invitation for a job the member does
not take part in (paused, left, on strike against its buyer or purpose) is declined -- logged, counted, nothing
starts -- and `enforce` stops a running job's SuperNode as soon as the member's choices no longer allow it.

Each invitation's nonce is what the agent signs that job's contribution reports with (`nonce_for`,
edge.federated.spool); the nonces are kept on disk (InvitationNonces), so that an agent restart loses none.

Then the task and the data: the first invitation of a job fetches the task's spec from the MID and verifies its
signature (edge.agent.job_task; refused: `task_spec_refused`), then cuts the task's windows from the agent's own
sample store, as the spec says (edge.sensors.export.WindowSource), into `mids/{mid}/jobs/{job_id}/windows.npz`, the
file the SuperNode's ClientApp trains on, with the verified spec beside it (`{task}@{version}.json`). A store
without the task's inputs, or with too few windows, declines the job with that reason (once: its re-invitations are
not cut again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from edge.agent.controls.decisions import RUN, Decision, DeclineReason
from edge.agent.membership import Membership
from edge.durable_file import replace_file
from edge.sensors.errors import MissingInputsError, TooFewWindowsError
from edge.sensors.export import WindowSource
from protocol.envelope import decode, open_envelope
from protocol.errors import InviteExpiredError, MalformedError, ProtocolError
from protocol.messages import Nonce, RoundInvitation, usable_sensors
from protocol.tasks.spec import UnknownTaskError, write_task_file

# What runs a job -- the SuperNode, its supervisor and warm executor, the task's signed spec -- is imported when a job
# first needs it: an idle agent on a Raspberry Pi hub keeps none of it resident (BENCHMARKS.md, "Raspberry Pi hub").
if TYPE_CHECKING:
    from edge.agent.job_task import TaskSpecFetch
    from edge.federated.acceleration.warm_executor import WarmExecutor
    from edge.federated.supernode import SuperNodeProcess
    from edge.federated.supervisor import SuperNodeSupervisor

log = logging.getLogger("midgate.agent.job")

MAX_INVITATION_BYTES = 8 * 1024
MAX_REMEMBERED_RUNS = 64
"""Run ids whose invitation nonce the agent keeps for records still in the spool (the oldest is forgotten first)."""
NONCES_FILE = "invitation-nonces.json"


class InvitationNonces(BaseModel):
    """The nonces of the MID's invitations the agent took, kept in the membership folder (NONCES_FILE): a body the
    ClientApp spooled before the agent restarted is still signed with its run's nonce, and not rejected for want of
    one (the coordinator re-invites only devices of a job still running, and only every so often)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    latest: Nonce | None = None
    """The latest job's nonce (JobNode.round_nonce)."""
    runs: dict[Annotated[str, StringConstraints(pattern=r"^[1-9][0-9]{0,19}$")], Nonce] = {}
    """Decimal run id -> its invitation's nonce, oldest first."""


MAX_REMEMBERED_DECLINES = 64
"""Jobs declined for their data whose re-invitations are ignored (the oldest is forgotten first)."""
WINDOW_FILE = "windows.npz"


def _detail(exc: Exception) -> str:
    """An error as a decline's detail: what was missing and what was found, without the error's own reason code."""
    text = str(exc)
    return text.removeprefix(f"{exc.reason}: ") if isinstance(exc, ProtocolError) else text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class _Job:
    job_id: str
    run_id: int
    deadline_ms: int
    supervisor: SuperNodeSupervisor
    buyer: str
    purpose: str


Admit = Callable[[str, str], Decision]
"""(buyer, purpose) -> run or decline."""


def _admit_all(buyer: str, purpose: str) -> Decision:
    return RUN


SensorConsent = Callable[[str, tuple[str, ...]], tuple[tuple[str, ...] | None, str | None]]
"""(task id, the kinds of sensor its inputs take) -> (the kinds the member's consent lets it use, None: every one;
why the consent gives it none, or None): protocol.messages.consent_sensor_gap over the member's choices."""


def _every_sensor(task_id: str, usable: tuple[str, ...]) -> tuple[tuple[str, ...] | None, str | None]:
    return None, None


def _kept_warm_executor(directory: Path) -> WarmExecutor:
    from edge.federated.acceleration.warm_executor import WarmExecutor

    return WarmExecutor(directory / "warm", log_path=directory / "warm.log")


class JobNode:
    """Owned by one MembershipRunner; all methods run on the agent's event loop."""

    def __init__(
        self,
        membership: Membership,
        spool_dir: Path,
        windows: WindowSource,
        admit: Admit = _admit_all,
        recheck: Admit = _admit_all,
        flower_acceleration: bool = True,
        task_specs: TaskSpecFetch | None = None,
        keep_warm_executor: bool = True,
        sensors: SensorConsent = _every_sensor,
    ) -> None:
        """`windows`: where a job's windows are cut from. `admit` decides each verified invitation (and counts
        declines); `recheck` asks the same of a running job without counting. Both default to taking part in every
        job. `flower_acceleration` (agent.toml's) runs each job's SuperNode through edge.federated.acceleration.
        `task_specs` fetches the MID's signed task specs (edge.agent.job_task); None: the built-in tasks only.
        `keep_warm_executor` (agent.toml's; with acceleration only): one warm executor from `run`'s start to its end,
        shared by every job's SuperNode, instead of one started for each job. `sensors`: which kinds of sensor the
        member lets a task use (default every kind); windows are cut from those only."""
        self.membership = membership
        self.sensors = sensors
        self.spool_dir = spool_dir
        self.windows = windows
        self.admit = admit
        self.recheck = recheck
        self.flower_acceleration = flower_acceleration
        self.task_specs = task_specs
        self.warm = _kept_warm_executor(membership.directory) if flower_acceleration and keep_warm_executor else None
        self.job: _Job | None = None
        self.refused = 0
        self.declined = 0
        self.data_declines: Counter[DeclineReason] = Counter()
        self._unfit: dict[str, Decision] = {}  # job id -> why its data declined it
        # The latest job's invitation nonce goes into that job's reports (edge.federated.spool.read_record); kept after
        # the job ends because its last records may reach the spool after the deadline. Invitations that name the run
        # (every one after the first) also map its run id to its nonce, so a record of an earlier job still waiting
        # in the spool when a new job starts carries its own job's nonce, not the new one (`nonce_for`).
        self.round_nonce: str | None = None
        self._run_nonces: dict[int, str] = {}
        self._load_nonces()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # invitations arrive as separate tasks; one job change at a time

    def open_invitation(self, payload: bytes, now_ms: int) -> RoundInvitation:
        """Verify a RoundInvitation: size, MID signature, deadline not passed. Raises a ProtocolError otherwise."""
        if len(payload) > MAX_INVITATION_BYTES:
            raise MalformedError("invitation too large", size=len(payload))
        mid_key = self.membership.mid_key
        invitation = decode(
            open_envelope(payload, {mid_key.key_id.hex(): mid_key}, RoundInvitation.PAYLOAD_TYPE), RoundInvitation
        )
        if invitation.deadline_ms <= now_ms:
            raise InviteExpiredError("invitation deadline passed", deadline_ms=invitation.deadline_ms, now_ms=now_ms)
        return invitation

    def _make_process(self, run_dir: Path) -> SuperNodeProcess:
        from edge.federated.acceleration.device import accelerated, in_one_process
        from edge.federated.supernode import NodeKey, SuperNodeProcess

        record = self.membership.record
        ca = self.membership.superlink_ca_file
        assert ca is not None
        keys = self.membership.flower_key_dir
        process = SuperNodeProcess(
            flwr_home=run_dir / "flwr",
            superlink=record.superlink,
            ca_cert=ca,
            key=NodeKey(keys / "supernode", keys / "supernode.pub"),
            data_path=run_dir / WINDOW_FILE,
            spool_dir=self.spool_dir,
            clientappio_port=_free_port(),
            log_path=run_dir / "supernode.log",
        )
        if not self.flower_acceleration:
            return process
        if self.warm is None:  # no warm executor kept between jobs: the leanest device, one process
            return in_one_process(process)
        return accelerated(process, run_dir / "warm", run_dir / "warm.log", kept=self.warm)

    async def invited(self, payload: bytes) -> None:
        async with self._lock:
            await self._invited(payload)

    async def _invited(self, payload: bytes) -> None:
        now_ms = time.time_ns() // 1_000_000
        try:
            invitation = self.open_invitation(payload, now_ms)
        except ProtocolError as exc:
            self.refused += 1
            log.warning("invitation refused", extra={"reason": str(exc.reason), "error": str(exc)})
            return
        decision = self.admit(invitation.buyer, invitation.purpose)
        if not decision.run:
            self._declined(invitation, decision)
            if self.job is not None and self.job.job_id == invitation.job_id:
                await self.stop(str(decision))
            return
        if self._remember_run(invitation):
            await self._save_nonces()
        if not self.membership.record.flower_node_id:
            log.warning("invited, but this device has no Flower node; not joining")
            return
        if self.job is not None and self.job.job_id == invitation.job_id:
            self.job.deadline_ms = max(self.job.deadline_ms, invitation.deadline_ms)
            return
        if invitation.job_id in self._unfit:
            return  # its data declined it at its first invitation; a re-invitation changes nothing
        run_dir = self.membership.directory / "jobs" / invitation.job_id
        run_dir.mkdir(parents=True, exist_ok=True)
        fit = await self._cut_windows(invitation, run_dir / WINDOW_FILE)
        if not fit.run and fit.reason is not None:
            self.data_declines[fit.reason] += 1
            self._unfit[invitation.job_id] = fit
            while len(self._unfit) > MAX_REMEMBERED_DECLINES:
                del self._unfit[next(iter(self._unfit))]
            self._declined(invitation, fit)
            return
        await self.stop("replaced by a new job")  # one SuperNode per device
        from edge.federated.supervisor import SuperNodeSupervisor

        supervisor = SuperNodeSupervisor(lambda: self._make_process(run_dir))
        await supervisor.__aenter__()
        i = invitation
        self.job = _Job(i.job_id, i.run_id, i.deadline_ms, supervisor, i.buyer, i.purpose)
        self.round_nonce = invitation.nonce
        await self._save_nonces()
        log.info("supernode started", extra={"job": invitation.job_id, "run_id": invitation.run_id})
        self._wake.set()

    def _declined(self, invitation: RoundInvitation, decision: Decision) -> None:
        self.declined += 1
        log.info(
            "invitation declined: job %s of buyer %s for purpose %s: %s",
            invitation.job_id,
            invitation.buyer,
            invitation.purpose,
            decision,
            extra={"job": invitation.job_id, "reason": str(decision.reason)},
        )

    async def _cut_windows(self, invitation: RoundInvitation, path: Path) -> Decision:
        """Cut the job's windows from the sample store into `path` (in a thread: it reads the whole store), or say
        why the data cannot take part."""
        from edge.agent.job_task import job_task

        mid_key = self.membership.mid_key
        try:
            i = invitation
            task = await asyncio.to_thread(job_task, i.task_id, i.task_version, mid_key, self.task_specs)
        except UnknownTaskError as exc:
            return Decision(False, DeclineReason.UNKNOWN_TASK, detail=_detail(exc))
        except ProtocolError as exc:
            return Decision(False, DeclineReason.TASK_SPEC_REFUSED, detail=f"{exc.reason}: {_detail(exc)}")
        allowed, refused = self.sensors(task.id, usable_sensors([i.sources for i in task.inputs]))
        if refused is not None:
            return Decision(False, DeclineReason.CONSENT_EXCLUDES, detail=refused)
        try:
            cut = await asyncio.to_thread(self.windows.cut, task, path, allowed)
        except TooFewWindowsError as exc:
            return Decision(False, DeclineReason.TOO_FEW_WINDOWS, detail=_detail(exc))
        except (MissingInputsError, ProtocolError, OSError, sqlite3.Error) as exc:  # no store, or an unreadable one
            return Decision(False, DeclineReason.NO_FITTING_DATA, detail=_detail(exc))
        # Beside the windows: the ClientApp trains the spec verified here (protocol.tasks.spec.load_task).
        await asyncio.to_thread(write_task_file, path.parent, task)
        log.info(
            "windows cut for job %s: %d windows of %s from sensor %s, fingerprint %s",
            invitation.job_id,
            cut.count,
            cut.task,
            cut.sensor,
            cut.fingerprint,
            extra={"job": invitation.job_id},
        )
        return RUN

    def _remember_run(self, invitation: RoundInvitation) -> bool:
        """Map the invitation's run id to its nonce (run id 0: the first invitation, sent before the run exists);
        True when that changed what the agent keeps."""
        runs = self._run_nonces
        if not invitation.run_id:
            return False
        if next(reversed(runs), None) == invitation.run_id and runs[invitation.run_id] == invitation.nonce:
            return False  # a renewal of the latest run: nothing to write
        runs.pop(invitation.run_id, None)
        runs[invitation.run_id] = invitation.nonce
        while len(runs) > MAX_REMEMBERED_RUNS:
            del runs[next(iter(runs))]
        return True

    @property
    def _nonces_path(self) -> Path:
        return self.membership.directory / NONCES_FILE

    def _load_nonces(self) -> None:
        """What an earlier run of the agent kept; an unreadable file costs only the nonces (logged), never the agent."""
        try:
            kept = InvitationNonces.model_validate_json(self._nonces_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, ValidationError) as exc:
            log.error("invitation nonces unreadable; starting without them", extra={"error": str(exc)[:300]})
            return
        self.round_nonce = kept.latest
        self._run_nonces = {int(run_id): nonce for run_id, nonce in kept.runs.items()}

    async def _save_nonces(self) -> None:
        kept = InvitationNonces(latest=self.round_nonce, runs={str(r): n for r, n in self._run_nonces.items()})
        # fsync off the event loop; the caller holds the job lock, so saves never overtake each other.
        await asyncio.to_thread(replace_file, self._nonces_path, kept.model_dump_json().encode())

    def nonce_for(self, run_id: int) -> str | None:
        """The nonce a report of `run_id` carries: that run's invitation's, else the latest job's (a run whose
        invitations named no run id yet is the latest job's: records exist only once the run does)."""
        return self._run_nonces.get(run_id, self.round_nonce)

    async def stop(self, why: str = "job ended") -> None:
        job, self.job = self.job, None  # taken before awaiting: a concurrent stop finds nothing left to stop
        if job is not None:
            await job.supervisor.stop()
            log.info("supernode stopped: %s", why, extra={"job": job.job_id})

    async def enforce(self) -> None:
        """Stop the running job's SuperNode (with everything below it) if the member's choices no longer allow it."""
        async with self._lock:
            if self.job is None:
                return
            decision = self.recheck(self.job.buyer, self.job.purpose)
            if not decision.run:
                await self.stop(str(decision))

    async def _warm_up(self) -> None:
        """Start the kept warm executor (a device without a Flower node never runs a job: none)."""
        if self.warm is None or not self.membership.record.flower_node_id:
            return
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.warm.ensure_started)
        except (OSError, RuntimeError) as exc:  # TimeoutError included; a job's SuperNode will try again
            log.warning("warm executor did not start", extra={"error": str(exc)[:300]})
            return
        log.info("warm executor ready in %.1f s", time.monotonic() - started, extra={"mid": self.membership.mid})

    async def run(self, stop: asyncio.Event) -> None:
        """Ends the job's SuperNode when its deadline passes; the agent stopping ends it too, and the kept warm
        executor after it."""
        warming = asyncio.create_task(self._warm_up())
        try:
            while not stop.is_set():
                if self.job is not None and time.time_ns() // 1_000_000 >= self.job.deadline_ms:
                    async with self._lock:
                        if self.job is not None and time.time_ns() // 1_000_000 >= self.job.deadline_ms:
                            await self.stop()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
        finally:
            await self.stop("agent stopping")
            if self.warm is not None:
                await asyncio.wait([warming])  # its thread keeps starting anyway: stop what it started
                await asyncio.to_thread(self.warm.stop)
