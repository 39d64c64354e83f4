"""What the buyer job API takes and answers (docs/protocol.md, "Buyer jobs"), and the job record it keeps.

Request bodies are strict (extra fields forbidden) and checked for size before parsing; answers are the stored job
document plus the progress read from the running job.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from protocol.messages import Ident

TaskKey = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}@[1-9][0-9]{0,5}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
IdempotencyKey = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")]

JobState = Literal["requested", "quoted", "accepted", "running", "settling", "delivered", "failed", "cancelled"]
TERMINAL: tuple[JobState, ...] = ("delivered", "failed", "cancelled")
LIVE: tuple[JobState, ...] = ("accepted", "running", "settling")


class JobRequestBody(BaseModel):
    """`POST /v1/jobs`: what the buyer wants trained.

    task: a task of the MID's catalogue, `id@version` (`GET /v1/tasks`).
    rounds: federated rounds (default: the task's recipe).
    min_members, max_members: how many members must / may train it (each member with all its eligible devices).
    purpose: what the model is for, a purpose code ([a-z0-9-]); members' strikes against it are honoured.
    dp_required: train with differential privacy (client-side clipping and Gaussian noise, the MID's `[market]`
        parameters).
    task_spec: a task the MID does not have yet, proposed by the buyer: a task spec document (protocol.tasks.spec)
        whose id@version is `task`. The job waits for the operator's approval (`midgate coordinator task approve
        JOB`) before it is quoted.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    task: TaskKey
    rounds: int | None = Field(default=None, ge=1, le=1000)
    min_members: int = Field(default=2, ge=1, le=10_000)
    max_members: int = Field(default=100, ge=1, le=10_000)
    purpose: Ident
    dp_required: bool = False
    task_spec: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.max_members < self.min_members:
            raise ValueError(f"max_members {self.max_members} is below min_members {self.min_members}")
        return self

    @property
    def task_id(self) -> str:
        return self.task.partition("@")[0]

    @property
    def task_version(self) -> int:
        return int(self.task.partition("@")[2])


class AcceptBody(BaseModel):
    """`POST /v1/jobs/{job_id}/accept`: the buyer pays the quote it names into escrow."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    quote_sha256: Sha256
    amount_minor: int = Field(ge=0, le=10**15)


class JobQuote(BaseModel):
    """The MID's price for a job: each chosen member's reservation price (its knob; the default knob when it set none),
    their sum (the member pool) and the MID fee on top (coordinator.royalties.quote.quote_job)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    members: list[str]
    devices: list[str]
    member_prices: dict[str, int]
    members_minor: int
    fee_minor: int
    total_minor: int
    currency: str
    policy_version: int
    fee_bps: int
    issued_ms: int
    expires_ms: int

    def sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


class Escrow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_minor: int
    currency: str
    quote_sha256: str
    index: int


class LedgerIndices(BaseModel):
    """Where the job's money moved in the MID's ledger (leaf indices)."""

    model_config = ConfigDict(extra="forbid")

    escrow: int | None = None
    job: int | None = None
    settlement: int | None = None
    release: int | None = None
    refund: int | None = None


class Progress(BaseModel):
    """The job as it runs: rounds done, its members, the global model's validation metrics after the latest round."""

    model_config = ConfigDict(extra="forbid")

    round: int = 0
    rounds: int = 0
    members: list[str] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)
    accuracy: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    run_id: int | None = None


class MarketJob(BaseModel):
    """One buyer job as stored and shown."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    buyer: str
    state: JobState = "requested"
    reason: str = ""
    created_ms: int
    updated_ms: int
    request: JobRequestBody
    validation_sha256: str | None = None
    validation_bytes: int | None = None
    quote: JobQuote | None = None
    quote_sha256: str | None = None
    escrow: Escrow | None = None
    cancel_requested: bool = False
    task_proposed: bool = False  # the request proposed its task; quoted once the operator approved it
    progress: Progress = Field(default_factory=Progress)
    model_version: str | None = None
    model_sha256: str | None = None
    manifest: bool = False
    ledger: LedgerIndices = Field(default_factory=LedgerIndices)


class JobList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[MarketJob]
