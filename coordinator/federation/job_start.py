"""`midgate coordinator job start`: the MID operator runs one buyer's training job on its own SuperLink.

A job is announced to each selected device by a MID-signed `RoundInvitation` on its `down/invite` topic; the agent
starts its SuperNode for the job and keeps it until the invitation's deadline (edge/agent/job_node.py). Devices whose
members said they will not come -- paused, striking against the job's buyer or purpose, left, consent excluding
the job -- devices whose member's reputation is below the MID policy's minimum for the job's purpose
(coordinator/policy/reputation.py, the rule the buyer market's quotes apply too) and devices the MID has not heard
from lately are not invited and not waited for (`expected_devices`, from what `serve` keeps of the devices' signed
heartbeats and strike votes: coordinator/registry/presence.py); the command says whom it waits for and whom not, and
why.

The command invites the others and submits the run through the SuperLink's Control API at once (ControlApi, in
process: each `flwr` CLI call cost seconds of Python start-up): the ServerApp starts while the devices start their
SuperNodes, and its first round waits for them up to the join timeout (NodeSelection), so no second of the job goes
to polling the SuperLink for joins. While the run lives it re-invites every selected device with a later deadline,
one lease ahead, and prints each round as it ends (elapsed time, nodes, the buyer's validation metrics). A run is
submitted successfully even when its ServerApp then fails, so the job's result is the run's status on the SuperLink
(`finished:completed`) together with the ServerApp's outcome.json, never the submission's success. The run's
output goes to the coordinator's `jobs_dir` (`run-<id>/`, where ingest cross-checks contribution reports with the
round captures), and every job is recorded in `job-book/<job id>.json` under the federation folder (`JobBook`),
which `job list` and `job show` read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

import aiomqtt
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

from coordinator.capture.directory import capture_summary_path, read_round_summary, read_validation
from coordinator.federation.control_api import RunControl, RunControlError
from coordinator.federation.job import TASKS_DIR, Aggregation, JobOutcome, aggregation_conflict
from coordinator.policy.document import MidPolicy
from coordinator.policy.reputation import Scores, below_minimum
from coordinator.registry.member_choices import knobs_for
from coordinator.registry.presence import absence, active_strikes
from coordinator.registry.store import Registry
from coordinator.registry.strikes import strike_refusal
from protocol.errors import ProtocolError
from protocol.identity import SignerKey
from protocol.job_log import JobDeviceEntry, JobLogRecord, MemberValue, model_version
from protocol.leaves import MAX_SIGNED_SIZE
from protocol.messages import RoundInvitation, usable_sensors
from protocol.tasks.schedule import LrSchedule
from protocol.tasks.spec import TaskSpec, get_task, write_task_file
from protocol.topics import DownKind, down_topic

APP_DIR = Path(__file__).resolve().parent / "app"
JOB_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
TERMINAL_PREFIX = "finished"
COMPLETED = "finished:completed"


class JobRequestError(Exception):
    """The job cannot start or went wrong; `reason` is a stable code, `details` name expected and found values."""

    def __init__(self, reason: str, message: str, **details: object) -> None:
        shown = ", ".join(f"{k}={v!r}" for k, v in details.items())
        super().__init__(f"{reason}: {message}" + (f" ({shown})" if shown else ""))
        self.reason = reason
        self.details = details


class JobRequest(BaseModel):
    """What the operator asks for. Every training setting left out comes from the task's recipe
    (protocol.tasks.spec.TrainingRecipe): a job started with only a task and devices runs the task's measured default.

    Parameters
    ----------
    job_id: names the job in invitations, reports and the job book ([a-z0-9-]).
    task_id, task_version: a published task (protocol.tasks registry).
    rounds: federated rounds (default: the task's).
    devices: device ids to train on; empty means every enrolled device with a Flower node ("all online"). Either way
        the devices known not to come are left out (`expected_devices`).
    min_nodes: fewest usable updates per round (the ServerApp fails the job below it).
    round_timeout_s: seconds the ServerApp waits for a round's replies.
    join_timeout_s: seconds the first round waits for the invited SuperNodes to connect (later rounds wait as long
        for a node that joined before and dropped out).
    validation_path: the buyer's validation window file, on the coordinator.
    purpose, buyer: what the data is used for and by whom; they go into every invitation.
    dp_clipping_norm, dp_noise_multiplier, dp_delta: the ServerApp's differential privacy (off at norm 0).
    local_epochs, batch_size, lr: the devices' local training (default: the task's).
    server_momentum: FedAvgM's server momentum (default: the task's; 0 is plain FedAvg).
    drift_correction: strength in [0, 1] of the drift correction (one gradient query per round before training;
        default: the task's, except 0 under DP, with which it is refused).
    lr_schedule: the devices' lr over the rounds (protocol.tasks.schedule; default: the task's).
    tail_average: the final model is the mean of the last K rounds' global models (default: the task's, at most
        `rounds`).
    attribution: value every round on the buyer's validation set (docs/attribution.md) so the job can be settled
        (default True).
    aggregation: `fedavg` (default) or Flower's robust `fedmedian`, `fedtrimmedavg`, `krum`, `bulyan`
        (coordinator.federation.job.Aggregation); with a robust one the recipe's server momentum defaults to 0.
    lease_s: a device keeps its SuperNode this long after the latest invitation; re-invited every lease / 3.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    task_id: str
    task_version: int = Field(ge=1)
    rounds: int = Field(ge=1, le=10_000)
    devices: tuple[str, ...] = ()
    min_nodes: int = Field(default=2, ge=1)
    round_timeout_s: float = Field(default=120.0, gt=0)
    join_timeout_s: float = Field(default=60.0, gt=0)
    validation_path: Path
    purpose: str = Field(pattern=JOB_ID_PATTERN)
    buyer: str = Field(pattern=JOB_ID_PATTERN)
    dp_clipping_norm: float = Field(default=0.0, ge=0)
    dp_noise_multiplier: float = Field(default=0.0, ge=0)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    local_epochs: int = Field(ge=1, le=1000)
    batch_size: int = Field(ge=1, le=65536)
    lr: float = Field(gt=0, le=10)
    server_momentum: float = Field(ge=0, lt=1)
    drift_correction: float = Field(ge=0, le=1)
    lr_schedule: LrSchedule
    tail_average: int = Field(ge=1, le=1000)
    attribution: bool = True
    aggregation: Aggregation = Aggregation.FEDAVG
    lease_s: float = Field(default=120.0, ge=15, le=86_400)

    @model_validator(mode="before")
    @classmethod
    def _task_recipe(cls, data: object, info: ValidationInfo) -> object:
        """Fill what is not given from the task's recipe: the spec in the validation context's "task" (the MID's
        catalogue's, `job start`), else the built-in one. A request read back with every field needs no spec."""
        if not isinstance(data, dict):
            return data
        given = {key: value for key, value in data.items() if value is not None}  # None: not given
        if all(name in given for name in _RECIPE_FIELDS):
            return given
        task = (info.context or {}).get("task")
        try:
            if not isinstance(task, TaskSpec) or (task.id, task.version) != (
                given.get("task_id"),
                given.get("task_version"),
            ):
                task = get_task(given.get("task_id"), given.get("task_version"))  # type: ignore[arg-type]
        except ProtocolError as error:  # unknown task or version: pydantic reports ValueErrors only
            raise ValueError(str(error)) from None
        recipe = task.recipe
        rounds = given.get("rounds", recipe.rounds)
        defaults: dict[str, object] = {
            "rounds": rounds,
            "local_epochs": recipe.local_epochs,
            "batch_size": recipe.batch_size,
            "lr": recipe.lr,
            "lr_schedule": recipe.lr_schedule,
            # FedAvgM's momentum is FedAvg's: a robust aggregation runs without it unless asked (and then refused).
            "server_momentum": recipe.server_momentum if given.get("aggregation", "fedavg") == "fedavg" else 0.0,
            # The recipe's drift correction is not silently turned into a refused DP job.
            "drift_correction": 0.0 if _positive(given.get("dp_clipping_norm")) else recipe.drift_correction,
            "tail_average": min(recipe.tail_average, rounds) if isinstance(rounds, int) else recipe.tail_average,
        }
        return {**defaults, **given}

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.devices and self.min_nodes > len(self.devices):
            raise ValueError(f"min_nodes {self.min_nodes} exceeds the {len(self.devices)} devices selected")
        if len(set(self.devices)) != len(self.devices):
            raise ValueError("a device is named twice")
        if self.dp_noise_multiplier > 0 and self.dp_clipping_norm <= 0:
            raise ValueError("DP noise needs a clipping norm")
        if self.tail_average > self.rounds:
            raise ValueError(f"tail_average {self.tail_average} exceeds the job's {self.rounds} rounds")
        if self.drift_correction > 0 and self.dp_clipping_norm > 0:
            raise ValueError(
                "drift correction cannot be combined with DP: its gradient query is neither clipped nor noised"
            )
        conflict = aggregation_conflict(self.aggregation, self.dp_clipping_norm, self.server_momentum)
        if conflict:
            raise ValueError(conflict)
        return self

    def run_config(
        self,
        node_ids: list[int],
        output_dir: Path,
        flower_acceleration: bool = True,
        member_groups: Sequence[Sequence[int]] = (),
    ) -> dict[str, str | int | float]:
        """The Flower app's run config (coordinator.federation.job.JobRunConfig) for these nodes; the MID's
        `[federation] flower_acceleration` goes in as `flower-acceleration`, and the nodes of each member with more
        than one device (`member_groups`) as `member-groups`."""
        return {
            "task-id": self.task_id,
            "task-version": self.task_version,
            "num-rounds": self.rounds,
            "selected-nodes": " ".join(str(n) for n in node_ids),
            "min-nodes": self.min_nodes,
            "round-timeout": self.round_timeout_s,
            "join-timeout": self.join_timeout_s,
            "validation-path": str(self.validation_path.resolve()),
            "output-dir": str(output_dir.resolve()),
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "lr": self.lr,
            "dp-clipping-norm": self.dp_clipping_norm,
            "dp-noise-multiplier": self.dp_noise_multiplier,
            "dp-delta": self.dp_delta,
            "server-momentum": self.server_momentum,
            "drift-correction": self.drift_correction,
            "lr-schedule": self.lr_schedule.value,
            "tail-average": self.tail_average,
            "attribution": self.attribution,
            "aggregation": self.aggregation.value,
            "flower-acceleration": flower_acceleration,
            "member-groups": " ".join(",".join(str(node) for node in group) for group in member_groups),
        }

    def wait_bound_s(self) -> float:
        """No wait is unbounded: the longest a healthy run of this job can take, with a margin."""
        return self.join_timeout_s + self.rounds * (self.round_timeout_s + self.join_timeout_s) + 300.0


_RECIPE_FIELDS = (
    "rounds",
    "local_epochs",
    "batch_size",
    "lr",
    "lr_schedule",
    "server_momentum",
    "drift_correction",
    "tail_average",
)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and value > 0


class JobDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    member_id: str
    node_id: int


def member_groups(devices: Sequence[JobDevice]) -> list[list[int]]:
    """The node ids of each member with more than one of `devices`, in the order they come: one player each in the
    job's attribution (docs/attribution.md, section 3)."""
    nodes: dict[str, list[int]] = {}
    for device in devices:
        nodes.setdefault(device.member_id, []).append(device.node_id)
    return [group for group in nodes.values() if len(group) > 1]


def select_devices(registry: Registry, names: tuple[str, ...]) -> list[JobDevice]:
    """The devices to invite: those named (each must be enrolled, not revoked, with a Flower node), or with no names
    every such device. A named device whose member left is kept for `expected_devices` to report as `left` (its key
    is revoked, it is never invited). Raises JobRequestError (unknown_device, revoked_device, no_flower_node,
    no_devices)."""
    if not names:
        candidates = [d for d in registry.devices() if not d.revoked]
        found = [(d, registry.flower_node(d.device_id)) for d in candidates]
        chosen = [JobDevice(device_id=d.device_id, member_id=d.member_id, node_id=n.node_id) for d, n in found if n]
        if not chosen:
            raise JobRequestError("no_devices", "no enrolled device has a Flower node", expected=">= 1", found=0)
        return chosen
    chosen = []
    departed = registry.departures()
    for name in names:
        device = registry.device(name)
        if device is None:
            raise JobRequestError("unknown_device", "no such enrolled device", device=name)
        if device.revoked and name not in departed:
            raise JobRequestError("revoked_device", "the device's key is revoked", device=name)
        node = registry.flower_node(name)
        if node is None:
            raise JobRequestError("no_flower_node", "the device enrolled without a Flower key", device=name)
        chosen.append(JobDevice(device_id=name, member_id=device.member_id, node_id=node.node_id))
    return chosen


JOB_LEAF_SHARE = 0.75
"""Of a leaf's 1 MiB, what a job's devices and members may fill in its JOB leaf at most: the rest is room for the
screens named and the job's same-data groups."""


def check_job_leaf_room(request: JobRequest, devices: list[JobDevice]) -> None:
    """Raises JobRequestError `too_many_devices` when the JOB leaf that would log a job of these devices, with every
    value at its widest, fills more than JOB_LEAF_SHARE of a leaf: such a job could never be logged, so never settled
    (docs/attribution.md, section 3). About 3,800 devices of one member each fit (ids of 9 to 12 characters)."""
    members: dict[str, int] = {}
    for device in devices:
        members[device.member_id] = members.get(device.member_id, 0) + request.rounds
    widest = JobLogRecord(
        job_id=request.job_id, run_id=(1 << 64) - 1, task_id=request.task_id, task_version=request.task_version,
        purpose=request.purpose, buyer=request.buyer, status="completed", rounds=request.rounds,
        rounds_completed=request.rounds, started_ms=_now_ms(), ended_ms=_now_ms(),
        devices=tuple(JobDeviceEntry(device=d.device_id, member=d.member_id, node_id=d.node_id, selected=True)
                      for d in devices),
        final_model_sha256="0" * 64, model_version=model_version(request.job_id, "0" * 64),
        attribution=tuple(MemberValue(member=m, value_units=-(1 << 62), rounds=r, excluded_rounds=r)
                          for m, r in sorted(members.items())),
        same_data_kept="smaller",
    )  # fmt: skip
    size = len(widest.canonical_json())
    if size > JOB_LEAF_SHARE * MAX_SIGNED_SIZE:
        raise JobRequestError(
            "too_many_devices",
            "the job's JOB leaf could not name this many devices and members: run it on fewer (--device)",
            devices=len(devices), members=len(members), bytes=size, limit=int(JOB_LEAF_SHARE * MAX_SIGNED_SIZE),
        )  # fmt: skip


def expected_devices(
    registry: Registry,
    devices: list[JobDevice],
    request: JobRequest,
    now_ms: int,
    offline_after_ms: int,
    task: TaskSpec | None = None,
    reputation: tuple[MidPolicy, Scores] | None = None,
) -> tuple[list[JobDevice], dict[str, str]]:
    """Split `devices` into those the job invites and waits for, and those it knows will not come (device id -> why:
    the member's logged consent excludes the job's buyer or purpose, or gives the job's task no sensor of its inputs
    (coordinator.registry.member_choices), the member left, its reputation is below the policy's minimum for the
    job's purpose (coordinator.policy.reputation.below_minimum), or coordinator.registry.presence.absence, from what
    the devices last said in signed messages). `task`: the job's spec (default the built-in one the request names).
    `reputation`: the policy in force and the members' logged scores (default None: no minimum applied)."""
    spec = task if task is not None else get_task(request.task_id, request.task_version)
    usable = usable_sensors([i.sources for i in spec.inputs])
    heard = registry.presence()
    striking = active_strikes(registry.strike_votes(), now_ms)
    consents = registry.consents()
    departed = registry.departures()
    members = (d.member_id for d in devices)
    low = {} if reputation is None else below_minimum(reputation[0], request.purpose, members, reputation[1])
    coming: list[JobDevice] = []
    absent: dict[str, str] = {}
    for device in devices:
        strikes = striking.get(device.device_id, [])
        consent = consents.get(device.member_id)
        why = None if consent is None else consent.excludes(request.buyer, request.purpose, spec.id, usable)
        if device.device_id in departed:
            why = "left"
        if why is None:
            why = low.get(device.member_id)
        if why is None:
            why = absence(
                heard.get(device.device_id), strikes, request.buyer, request.purpose, now_ms, offline_after_ms
            )
        if why is None:
            coming.append(device)
        else:
            absent[device.device_id] = why
    return coming, absent


def round_invitation(
    request: JobRequest, run_id: int, server_round: int, nonce: str, now_ms: int, mid_key: SignerKey
) -> bytes:
    """The signed invitation one device receives; `deadline_ms` is one lease from now."""
    return RoundInvitation(
        job_id=request.job_id,
        run_id=run_id,
        round=server_round,
        task_id=request.task_id,
        task_version=request.task_version,
        purpose=request.purpose,
        buyer=request.buyer,
        nonce=nonce,
        issued_ms=now_ms,
        deadline_ms=now_ms + int(request.lease_s * 1000),
    ).seal(mid_key)


@dataclass(frozen=True)
class BrokerLogin:
    host: str
    port: int
    username: str
    password: str
    client_id: str
    ca_file: str | None = None
    mqtt5: bool = True


class InvitationSender:
    """Publishes invitations with the coordinator's login (its ACL writes `dev/+/down/#`) on its own client id, so it
    never takes over `serve`'s persistent session. `JobRun` is synchronous (it polls the SuperLink between rounds), so
    each burst of invitations is one short aiomqtt connection on an event loop of its own; `with` checks up front that
    the broker takes the login, before the job is recorded."""

    def __init__(self, login: BrokerLogin, timeout_s: float = 30.0) -> None:
        self.login = login
        self.timeout_s = timeout_s

    def __enter__(self) -> Self:
        self.send_all([])
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def send_all(self, messages: list[tuple[str, bytes]]) -> None:
        """Publish each (topic, payload) at QoS 1 and return once the broker acknowledged every one."""
        asyncio.run(self._publish(messages))

    async def _publish(self, messages: list[tuple[str, bytes]]) -> None:
        login = self.login
        tls = (
            aiomqtt.TLSParameters(ca_certs=login.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if login.ca_file
            else None
        )
        client = aiomqtt.Client(
            login.host,
            login.port,
            username=login.username,
            password=login.password,
            identifier=login.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if login.mqtt5 else aiomqtt.ProtocolVersion.V311,
            keepalive=30,
            timeout=self.timeout_s,
            tls_params=tls,
        )
        client.pending_calls_threshold = max(10, len(messages))
        try:
            async with client:
                await asyncio.gather(*(client.publish(topic, payload, qos=1) for topic, payload in messages))
        except aiomqtt.MqttError as exc:
            raise JobRequestError(
                "broker_unreachable", "invitations not acknowledged by the broker", host=login.host, error=str(exc)
            ) from None


JobStatus = Literal["inviting", "running", "completed", "failed"]


class JobRecord(BaseModel):
    """One job as the MID ran it: what was asked, who was invited and selected, the run and its outcome."""

    model_config = ConfigDict(extra="forbid")

    request: JobRequest
    invited: list[JobDevice]
    nonces: dict[str, str]  # device id -> the invitation nonce its reports of this job carry
    not_waited_for: dict[str, str] = Field(default_factory=dict)
    """Devices the job selected but knew would not come (device id -> why): not invited, not waited for."""
    selected_node_ids: list[int] = Field(default_factory=list)
    run_id: int | None = None
    submitted_ms: int | None = None
    """When the run was submitted to the SuperLink (`started_ms` is when the command began)."""
    status: JobStatus = "inviting"
    flower_status: str = ""
    reason: str = ""
    rounds_completed: int = 0
    started_ms: int
    ended_ms: int | None = None
    outcome: JobOutcome | None = None
    # What buyers report revenue against (protocol.job_log.model_version); set when the job completed.
    model_version: str | None = None
    knobs_milli: dict[str, int] = Field(default_factory=dict)
    """Member -> its logged knob when the job started (coordinator.registry.member_choices.knobs_for): the job is
    settled at these prices, so a knob changed while it runs applies from the next job."""


class JobPayment(BaseModel):
    """The buyer's payment for a job as the operator recorded it with `job settle` (until the buyer API takes
    payments). `serve`, the ledger's writer, settles it under the MID's policy and appends the SETTLEMENT leaf
    (coordinator/federation/job_ledger.py)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    payment_minor: int = Field(ge=0, le=10**15)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    recorded_ms: int = Field(ge=0)


class JobBook:
    """One `<job id>.json` per job (written atomically: temporary name, fsync, rename)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.json"

    def write(self, record: JobRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{record.request.job_id}.json.tmp"
        tmp.write_text(record.model_dump_json(indent=1))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(self.path(record.request.job_id))

    def read(self, job_id: str) -> JobRecord | None:
        path = self.path(job_id)
        if not path.exists():
            return None
        return _parse_record(path)

    def records(self) -> Iterator[JobRecord]:
        for path in sorted(self.directory.glob("*.json")):
            yield _parse_record(path)

    def job_ids(self) -> list[str]:
        """The ids of every recorded job, without reading the records."""
        return sorted(path.stem for path in self.directory.glob("*.json"))

    @property
    def payments_dir(self) -> Path:
        return self.directory / "payments"

    def record_payment(self, payment: JobPayment) -> JobPayment:
        """Record a job's payment once: written in full under a temporary name, fsynced, then linked to its name,
        which fails if a payment is already there. Returns the payment on record: this one, or the one before."""
        self.payments_dir.mkdir(parents=True, exist_ok=True)
        path = self.payments_dir / f"{payment.job_id}.json"
        tmp = self.payments_dir / f".{payment.job_id}.{secrets.token_hex(4)}.tmp"
        tmp.write_text(payment.model_dump_json())
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        recorded = self.payment(payment.job_id)
        assert recorded is not None
        return recorded

    def payment(self, job_id: str) -> JobPayment | None:
        path = self.payments_dir / f"{job_id}.json"
        if not path.exists():
            return None
        return JobPayment.model_validate_json(path.read_bytes())

    def paid_job_ids(self) -> list[str]:
        """The ids of every job with a recorded payment."""
        return sorted(path.stem for path in self.payments_dir.glob("*.json"))


def _parse_record(path: Path) -> JobRecord:
    # Lax, as JobOutcome.read: JSON object keys are strings, the outcome's round numbers ints.
    return JobRecord.model_validate(json.loads(path.read_text()), strict=False)


def rounds_captured(run_dir: Path) -> int:
    """Rounds whose replies the ServerApp captured (capture.CaptureDirectory writes `round-NNNNNN.json`)."""
    return len(list(run_dir.glob("round-[0-9][0-9][0-9][0-9][0-9][0-9].json")))


def job_succeeded(flower_status: str, outcome: JobOutcome | None, rounds: int) -> bool:
    """A job succeeded only when the SuperLink says the run completed *and* the ServerApp recorded every round."""
    return (
        flower_status == COMPLETED
        and outcome is not None
        and outcome.status == "finished"
        and outcome.rounds_completed == rounds
    )


@dataclass
class JobRun:
    """Runs one JobRequest to its end; `report` receives one line per event (the CLI prints them).

    Parameters
    ----------
    request: the job.
    registry: the MID's device registry (device -> member -> Flower node id).
    mid_key: signs the invitations.
    mid: the MID's id (topics).
    control: the MID's SuperLink (coordinator.federation.control_api.ControlApi).
    sender: an open InvitationSender.
    jobs_dir: the ServerApp's output folder (the coordinator's `jobs_dir`); the run writes `run-<id>/` there.
    book: where the job is recorded.
    report: progress lines.
    offline_after_s: a device not heard from for this long is not waited for (the MID's
        `[ingest] heartbeat_offline_s`; default 180).
    poll_s: seconds between looks at the run's folder (round captures, validations, outcome.json) (default 0.25).
    status_every_s: seconds between looks at the run's status on the SuperLink while the run has no outcome yet
        (default 2; once the outcome is written, every `poll_s`).
    flower_acceleration: the run's `flower-acceleration` (the MID's `[federation] flower_acceleration`; default True).
    one_player_per_member: hand the ServerApp the nodes of each member with several invited devices
        (`member-groups`), valued as one player (the MID's `[federation] one_player_per_member`; default True).
    task: the job's spec from the MID's catalogue, handed to the ServerApp under `jobs_dir/tasks/`; default None: the
        built-in spec the request names.
    strike_quorum_bps, strike_min_members: the strike quorum of the MID policy in force (`[strikes] quorum_bps`,
        `min_members`; defaults 5000 and 1): a job whose buyer and purpose a strike in force covers is refused with
        reason `strike` (coordinator.registry.strikes).
    strike_stops_running: the policy's `[strikes] running_jobs = "stop"` (default False, "finish"): while the run
        goes on, each look at its status also asks whether a strike in force now covers the job, and if one does
        the run is stopped and the job ends failed with reason `strike`.
    reputation: the MID policy in force and the members' scores (coordinator.policy.reputation.logged_scores on the
        ledger): a device whose member's reputation is below the policy's `[reputation] min_milli` for the job's
        purpose is not invited (`expected_devices`); default None, no minimum applied.
    """

    request: JobRequest
    registry: Registry
    mid_key: SignerKey
    mid: str
    control: RunControl
    sender: InvitationSender
    jobs_dir: Path
    book: JobBook
    report: Callable[[str], None]
    offline_after_s: float = 180.0
    poll_s: float = 0.25
    status_every_s: float = 2.0
    flower_acceleration: bool = True
    one_player_per_member: bool = True
    task: TaskSpec | None = None
    strike_quorum_bps: int = 5000
    strike_min_members: int = 1
    strike_stops_running: bool = False
    reputation: tuple[MidPolicy, Scores] | None = None
    clock: Callable[[], float] = time.monotonic
    _started: float = field(default=0.0, init=False)

    def run(self) -> JobRecord:
        self._started = self.clock()
        if self.book.read(self.request.job_id) is not None:
            raise JobRequestError("job_exists", "a job with this id was already run", job=self.request.job_id)
        now = _now_ms()
        struck = self._struck(now)
        if struck is not None:
            raise JobRequestError("strike", struck, buyer=self.request.buyer, purpose=self.request.purpose)
        devices, absent = expected_devices(
            self.registry,
            select_devices(self.registry, self.request.devices),
            self.request,
            now,
            int(self.offline_after_s * 1000),
            self.task,
            self.reputation,
        )
        check_job_leaf_room(self.request, devices)
        record = JobRecord(
            request=self.request,
            invited=devices,
            nonces={d.device_id: secrets.token_hex(16) for d in devices},
            not_waited_for=absent,
            started_ms=now,
            knobs_milli=knobs_for(sorted({d.member_id for d in devices}), self.registry.knobs()),
        )
        self.book.write(record)
        try:
            return self._run(record)
        except BaseException as exc:
            if record.run_id is not None and record.status == "running":
                with contextlib.suppress(RunControlError, OSError):
                    self.control.stop_run(record.run_id)
            self._finish(record, "failed", getattr(exc, "reason", type(exc).__name__))
            raise

    def _struck(self, now_ms: int) -> str | None:
        """Why a strike in force now covers this job's buyer and purpose, or None."""
        return strike_refusal(
            self.registry,
            self.request.buyer,
            self.request.purpose,
            self.strike_quorum_bps,
            now_ms,
            self.strike_min_members,
        )

    def _run(self, record: JobRecord) -> JobRecord:
        request = self.request
        if record.not_waited_for:
            absent = ", ".join(f"{device} ({why})" for device, why in record.not_waited_for.items())
            self.report(f"not waiting for {len(record.not_waited_for)} device(s): {absent}")
        selected = record.invited
        record.selected_node_ids = [d.node_id for d in selected]
        if len(selected) < request.min_nodes:
            self.report(f"{len(selected)} device(s) can take part, fewer than min_nodes {request.min_nodes}")
            return self._finish(record, "failed", "too_few_nodes")
        self._invite(record, selected, run_id=0, server_round=1)
        self.report(
            f"invited {len(selected)} device(s); the first round waits up to {request.join_timeout_s:.0f} s for them"
            f" to join: {', '.join(d.device_id for d in selected)}"
        )
        run_config = request.run_config(
            record.selected_node_ids,
            self.jobs_dir,
            self.flower_acceleration,
            member_groups(selected) if self.one_player_per_member else [],
        )
        if self.task is not None:
            (self.jobs_dir / TASKS_DIR).mkdir(parents=True, exist_ok=True)
            write_task_file(self.jobs_dir / TASKS_DIR, self.task)
        record.run_id = self.control.submit_run(APP_DIR, run_config)
        record.status = "running"
        record.submitted_ms = _now_ms()
        self.book.write(record)
        # The first invitation could name no run; this one does, so each agent keys its reports of the run to the
        # job's nonce even when another job's invitation reaches it meanwhile.
        self._invite(record, selected, record.run_id, 1)
        self.report(f"run {record.run_id} submitted with {len(selected)} node(s)")
        return self._follow(record, selected)

    def _follow(self, record: JobRecord, selected: list[JobDevice]) -> JobRecord:
        assert record.run_id is not None
        run_dir = self.jobs_dir / f"run-{record.run_id}"
        devices = {d.node_id: d.device_id for d in selected}
        progress = RoundProgress(
            self.jobs_dir, record.run_id, devices, self.request, self.report, self.clock, self._started
        )
        deadline = self.clock() + self.request.wait_bound_s()
        reinvite_every = self.request.lease_s / 3
        last_invite = self.clock()
        next_status = self.clock() + self.status_every_s
        status = ""
        while True:
            done = rounds_captured(run_dir)
            if done != record.rounds_completed:
                record.rounds_completed = done
                self.book.write(record)
            progress.show()
            outcome_written = (run_dir / "outcome.json").exists()
            if outcome_written or self.clock() >= next_status:
                status = self.control.run_status(record.run_id)
                # After the outcome the ServerApp is exiting: the SuperLink says so within a second.
                next_status = self.clock() + (self.poll_s if outcome_written else self.status_every_s)
                if status.startswith(TERMINAL_PREFIX):
                    break
                struck = self._struck(_now_ms()) if self.strike_stops_running and not outcome_written else None
                if struck is not None:
                    self.control.stop_run(record.run_id)
                    record.flower_status = status
                    return self._stopped_by_strike(record, struck)
            if self.clock() >= deadline:
                self.control.stop_run(record.run_id)
                record.flower_status = status
                return self._finish(record, "failed", "timeout")
            if self.clock() - last_invite >= reinvite_every:
                self._invite(record, selected, record.run_id, min(done + 1, self.request.rounds))
                last_invite = self.clock()
            time.sleep(self.poll_s)
        record.flower_status = status
        record.outcome = _read_outcome(run_dir, self.clock)
        progress.show()
        if record.outcome is not None:
            record.rounds_completed = record.outcome.rounds_completed
        if job_succeeded(status, record.outcome, self.request.rounds):
            return self._finish(record, "completed", "")
        struck = self._struck(_now_ms()) if self.strike_stops_running else None
        if struck is not None:
            # The strikers' devices left the run (each agent stops its SuperNode at its own strike) and the run failed
            # for want of them before a status look could stop it: the strike in force ended it, as the policy says.
            return self._stopped_by_strike(record, struck)
        reason = record.outcome.reason if record.outcome is not None and record.outcome.reason else status
        return self._finish(record, "failed", reason or "no_outcome")

    def _stopped_by_strike(self, record: JobRecord, struck: str) -> JobRecord:
        """The job ended by the strike in force `struck` (the policy's `running_jobs = "stop"`): said, and failed."""
        assert record.run_id is not None
        self.report(f"run {record.run_id} stopped: {struck}")
        return self._finish(record, "failed", "strike")

    def _invite(self, record: JobRecord, devices: list[JobDevice], run_id: int, server_round: int) -> None:
        now = _now_ms()
        messages = []
        for device in devices:
            payload = round_invitation(
                self.request, run_id, server_round, record.nonces[device.device_id], now, self.mid_key
            )
            messages.append((down_topic(self.mid, device.device_id, DownKind.INVITE), payload))
        self.sender.send_all(messages)

    def _finish(self, record: JobRecord, status: JobStatus, reason: str) -> JobRecord:
        record.status = status
        record.reason = reason
        record.ended_ms = _now_ms()
        if status == "completed" and record.outcome is not None and record.outcome.final_model_sha256:
            record.model_version = model_version(self.request.job_id, record.outcome.final_model_sha256)
        self.book.write(record)
        return record


@dataclass
class RoundProgress:
    """One line per round as the run ends it: elapsed time since the command began, the round's own time, how many
    nodes sent an update, and the global model's metrics on the buyer's validation set (the ServerApp writes them per
    round: CaptureDirectory.record_validation); after the first round, the devices that did not join."""

    jobs_dir: Path
    run_id: int
    devices: dict[int, str]  # node id -> device id, of the selected devices
    request: JobRequest
    report: Callable[[str], None]
    clock: Callable[[], float]
    started: float
    shown: int = 0

    def show(self) -> None:
        """Print every round ended since the last call."""
        while self.shown < self.request.rounds:
            server_round = self.shown + 1
            scored = read_validation(self.jobs_dir / f"run-{self.run_id}", server_round)
            summary = capture_summary_path(self.jobs_dir, self.run_id, server_round)
            if scored is None or not summary.exists():
                return
            capture = read_round_summary(summary.read_bytes(), server_round)
            metrics, seconds = scored
            took = "" if seconds is None else f" (the round {seconds:.1f} s)"
            shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(metrics.items()))
            self.report(
                f"round {server_round}/{self.request.rounds}: {self.clock() - self.started:.1f} s{took},"
                f" {len(capture.updates)} node(s), {shown}"
            )
            if server_round == 1:
                came = {u.node_id for u in capture.updates} | {d.node_id for d in capture.drops}
                missing = [device for node, device in self.devices.items() if node not in came]
                if missing:
                    self.report(f"not joined within {self.request.join_timeout_s:.0f} s: {', '.join(missing)}")
            self.shown = server_round


def _read_outcome(run_dir: Path, clock: Callable[[], float], wait_s: float = 15.0) -> JobOutcome | None:
    """The ServerApp writes outcome.json as it ends, which can be just after the SuperLink reports the run finished."""
    deadline = clock() + wait_s
    while not (run_dir / "outcome.json").exists():
        if clock() >= deadline:
            return None
        time.sleep(0.1)
    return JobOutcome.read(run_dir)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
