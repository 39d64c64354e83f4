"""The ledger's JOB and ROUND leaves: what a job was, who trained it, what each round received and what it was worth.

`coordinator serve`, the ledger's one writer, appends them once `job start` has recorded a job as completed or failed
(coordinator/federation/job_ledger.py): one JOB leaf, then one ROUND leaf per round the ServerApp captured, in one
transaction. As with settlement records, a leaf's body is the record's canonical JSON (sorted keys, no whitespace):
the MID's signed checkpoint over the log commits to it, so a receipt for the leaf is the MID's signature on it. Values
are integer nano-units of validation-loss drop (coordinator.attribution.history.VALUE_SCALE), never floats, so the
settlement that splits a payment by them is integer arithmetic anyone can redo.

A job's **model version** is the name a buyer reports revenue against (`RevenueReport.model_version`):
`<job id>:<first 16 hex digits of the final model's SHA-256>` (protocol.tasks.arrays.arrays_sha256 over
`final-model.npz`'s arrays; the JOB leaf holds all 64). Job ids are unique per MID, so the version is too; the hash
part lets a buyer check that the model it holds is the one the version names.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal, Self, TypeVar

from pydantic import Field, SerializerFunctionWrapHandler, ValidationError, model_serializer, model_validator

from protocol.errors import MalformedError, TooLargeError
from protocol.leaves import MAX_SIGNED_SIZE
from protocol.messages import U64, CanonicalModel, Ident, Measurement, Sha256Hex, ShortText, TimeMs

MODEL_VERSION_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}:[0-9a-f]{16}$"
ModelVersion = Annotated[str, Field(pattern=MODEL_VERSION_PATTERN)]
ValueUnits = Annotated[int, Field(ge=-(1 << 62), le=1 << 62)]
ScreenReasons = Annotated[tuple[ShortText, ...], Field(max_length=16)]


def model_version(job_id: str, final_model_sha256: str) -> str:
    """The model version of a job's final model (module docstring). Requires a job id and a 64-hex SHA-256."""
    version = f"{job_id}:{final_model_sha256[:16]}"
    if not re.fullmatch(r"[0-9a-f]{64}", final_model_sha256) or not re.fullmatch(MODEL_VERSION_PATTERN, version):
        raise MalformedError("not a job id and a SHA-256", job_id=job_id, sha256=final_model_sha256)
    return version


class JobDeviceEntry(CanonicalModel):
    """A device the job invited: its member, its Flower node, and whether the run was restricted to it."""

    device: Ident
    member: Ident
    node_id: U64
    selected: bool


class MemberValue(CanonicalModel):
    """One member's attribution over the job, summed over its devices: what its settlement is split by."""

    member: Ident
    value_units: ValueUnits
    rounds: int = Field(ge=0)
    excluded_rounds: int = Field(ge=0)
    screens: ScreenReasons = ()


class JobGroupEntry(CanonicalModel):
    """A job group: a pair of the job's nodes (smaller id first) whose same-data evidence over the job's rounds
    reached the threshold (protocol/job_attribution.py), their members, and the valued rounds in which the pair was
    paid as one member."""

    nodes: tuple[U64, U64]
    members: tuple[Ident, Ident]
    rounds: Annotated[tuple[int, ...], Field(max_length=10_000)]

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.nodes[0] >= self.nodes[1]:
            raise ValueError("a job group's nodes must be two, smaller id first")
        if list(self.rounds) != sorted(set(self.rounds)) or any(r < 1 for r in self.rounds):
            raise ValueError("a job group's rounds must be increasing round numbers")
        return self


class JobLogRecord(CanonicalModel):
    """The body of a JOB leaf. `model_version` and `final_model_sha256` are set only for a completed job;
    `attribution` is empty for a job run without attribution. `job_groups` (left out of the encoding when empty, so a
    leaf from before it keeps its bytes) names the job's same-data groups, sorted by nodes."""

    SCHEMA: ClassVar[str] = "midgate.job.v1"
    schema_id: Literal["midgate.job.v1"] = "midgate.job.v1"
    job_id: Ident
    run_id: U64 | None
    task_id: Ident
    task_version: int = Field(ge=1, le=1_000_000)
    purpose: Ident
    buyer: Ident
    status: Literal["completed", "failed"]
    reason: ShortText = ""
    rounds: int = Field(ge=1, le=10_000)
    rounds_completed: int = Field(ge=0, le=10_000)
    started_ms: TimeMs
    ended_ms: TimeMs
    devices: tuple[JobDeviceEntry, ...] = Field(max_length=100_000)
    final_model_sha256: Sha256Hex | None = None
    model_version: ModelVersion | None = None
    final_validation: dict[ShortText, Measurement] = Field(default_factory=dict, max_length=16)
    attribution: tuple[MemberValue, ...] = Field(default=(), max_length=100_000)
    job_groups: tuple[JobGroupEntry, ...] = Field(default=(), max_length=100_000)

    @model_validator(mode="after")
    def _groups_sorted(self) -> Self:
        nodes = [g.nodes for g in self.job_groups]
        if nodes != sorted(set(nodes)):
            raise ValueError("job_groups must be sorted by nodes and unique")
        return self

    @model_serializer(mode="wrap")
    def _without_job_groups_when_none(self, handler: SerializerFunctionWrapHandler) -> object:
        return _without_empty(handler(self), "job_groups")


class RoundUpdateEntry(CanonicalModel):
    """One update the round aggregated, as Flower delivered it, and its value in this round (undecayed; None when
    the round was not valued)."""

    device: Ident
    member: Ident
    node_id: U64
    update_sha256: Sha256Hex
    examples_reported: int = Field(ge=0)
    value_units: ValueUnits | None = None
    excluded: bool = False
    screens: ScreenReasons = ()


class RoundDropEntry(CanonicalModel):
    """A selected node whose update is not in the round; `device` is None for a node the job did not invite."""

    device: Ident | None
    node_id: U64
    reason: ShortText
    detail: ShortText = ""


class RoundSameDataPair(CanonicalModel):
    """A pair of the round's nodes (smaller id first) whose same-data similarity the screens reported, in integer
    milli-units (rounded half to even): the evidence the job's grouping adds up (protocol/job_attribution.py)."""

    nodes: tuple[U64, U64]
    similarity_milli: int = Field(ge=-1000, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.nodes[0] >= self.nodes[1]:
            raise ValueError("a same-data pair's nodes must be two, smaller id first")
        return self


class RoundLogRecord(CanonicalModel):
    """The body of a ROUND leaf. `valuation` is the method that valued it (`exact`, `sampled`, `first_order`,
    `none`), or empty with `skipped` saying why it was not valued. `groups` are the round's players of more than one
    node (each sorted, ordered by their first node) and `same_data` the similarities its screens reported (sorted by
    nodes): with the updates' values, all a job's settlement reads of the round. Both are left out of the encoding
    when empty, so a leaf from before them keeps its bytes."""

    SCHEMA: ClassVar[str] = "midgate.round.v1"
    schema_id: Literal["midgate.round.v1"] = "midgate.round.v1"
    job_id: Ident
    run_id: U64
    round: int = Field(ge=1, le=10_000)
    global_sha256: Sha256Hex
    updates: tuple[RoundUpdateEntry, ...] = Field(max_length=100_000)
    drops: tuple[RoundDropEntry, ...] = Field(max_length=100_000)
    valuation: ShortText = ""
    skipped: ShortText = ""
    groups: tuple[Annotated[tuple[U64, ...], Field(min_length=2, max_length=100_000)], ...] = Field(
        default=(), max_length=100_000
    )
    same_data: tuple[RoundSameDataPair, ...] = Field(default=(), max_length=100_000)

    @model_validator(mode="after")
    def _evidence_sorted(self) -> Self:
        if any(list(g) != sorted(set(g)) for g in self.groups) or [g[0] for g in self.groups] != sorted(
            {g[0] for g in self.groups}
        ):
            raise ValueError("groups must be sorted node ids, ordered by their first node")
        if [p.nodes for p in self.same_data] != sorted({p.nodes for p in self.same_data}):
            raise ValueError("same_data must be sorted by nodes and unique")
        admitted = {u.node_id for u in self.updates if not u.excluded}
        grouped = [node for group in self.groups for node in group]
        if len(set(grouped)) != len(grouped) or not admitted.issuperset(grouped):
            raise ValueError("groups must name admitted updates' nodes, each in one group at most")
        if not {u.node_id for u in self.updates}.issuperset(n for p in self.same_data for n in p.nodes):
            raise ValueError("same_data must name the round's updates' nodes")
        return self

    @model_serializer(mode="wrap")
    def _without_evidence_when_none(self, handler: SerializerFunctionWrapHandler) -> object:
        return _without_empty(handler(self), "groups", "same_data")


def _without_empty(dumped: object, *names: str) -> object:
    """A dump without the named fields when they are empty: fields added later keep older leaves' bytes."""
    if isinstance(dumped, dict):
        for name in names:
            if not dumped.get(name, True):
                dumped.pop(name)
    return dumped


def decode_job_record(data: bytes) -> JobLogRecord:
    """A JOB leaf's body; size first, then the strict schema, then the canonical form."""
    return _decode(JobLogRecord, data)


def decode_round_record(data: bytes) -> RoundLogRecord:
    """A ROUND leaf's body; size first, then the strict schema, then the canonical form."""
    return _decode(RoundLogRecord, data)


R = TypeVar("R", bound=CanonicalModel)


def _decode(model: type[R], data: bytes) -> R:
    if len(data) > MAX_SIGNED_SIZE:
        raise TooLargeError(f"{model.__name__} too large", limit=MAX_SIGNED_SIZE, found=len(data))
    try:
        record = model.model_validate_json(data)
    except ValidationError as error:
        raise MalformedError(
            f"not a {model.__name__}", errors=error.error_count(), first=error.errors()[0]["msg"]
        ) from None
    if record.canonical_json() != data:
        raise MalformedError(f"{model.__name__} is not in canonical encoding", size=len(data))
    return record
