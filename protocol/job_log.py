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
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Annotated, ClassVar, Literal, Self, TypeVar

from pydantic import Field, SerializerFunctionWrapHandler, ValidationError, model_serializer, model_validator

from protocol.errors import MalformedError, TooLargeError
from protocol.leaves import MAX_SIGNED_SIZE
from protocol.messages import U64, CanonicalModel, Ident, Measurement, Sha256Hex, ShortText, TimeMs, canonical_text

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


class JobGroupSet(CanonicalModel):
    """Job groups written as one: every pair of `nodes` (more than two, sorted) is a job group, paid as one member in
    the same valued `rounds`; their members are the nodes' in the JOB leaf's `devices`. A set of 20 copies of one
    data set is 20 node ids here, not 190 pairs."""

    nodes: Annotated[tuple[U64, ...], Field(min_length=3, max_length=100_000)]
    rounds: Annotated[tuple[int, ...], Field(max_length=10_000)]

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if list(self.nodes) != sorted(set(self.nodes)):
            raise ValueError("a job group set's nodes must be sorted and distinct")
        if list(self.rounds) != sorted(set(self.rounds)) or any(r < 1 for r in self.rounds):
            raise ValueError("a job group set's rounds must be increasing round numbers")
        return self


JobPairs = dict[tuple[int, int], tuple[tuple[str, str], tuple[int, ...]]]
"""Job groups by node pair (smaller first): their members and the rounds paid as one."""

SameDataKept = Literal["larger", "smaller"]
"""What a set of several players paid as one member keeps of a round: the larger of its players' values, or the
smaller of those above 0 (protocol/job_attribution.py). A JOB leaf that names none was settled by "larger", the rule
before it."""


class JobLogRecord(CanonicalModel):
    """The body of a JOB leaf. `model_version` and `final_model_sha256` are set only for a completed job;
    `attribution` is empty for a job run without attribution. `job_groups` names the job's same-data groups, sorted by
    nodes, except those `job_group_sets` writes as sets (sorted by nodes; a pair in one is in no other, nor in
    `job_groups`); `job_pairs()` gives them all. Both are left out of the encoding when empty, so a leaf from before
    them keeps its bytes; so is `same_data_kept` when None, which a leaf from before it reads as "larger"."""

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
    job_group_sets: tuple[JobGroupSet, ...] = Field(default=(), max_length=100_000)
    same_data_kept: SameDataKept | None = None

    @model_validator(mode="after")
    def _groups_sorted(self) -> Self:
        nodes = [g.nodes for g in self.job_groups]
        if nodes != sorted(set(nodes)):
            raise ValueError("job_groups must be sorted by nodes and unique")
        if [s.nodes for s in self.job_group_sets] != sorted({s.nodes for s in self.job_group_sets}):
            raise ValueError("job_group_sets must be sorted by nodes and unique")
        if self.job_group_sets:
            named = {d.node_id for d in self.devices}
            if not named.issuperset(n for s in self.job_group_sets for n in s.nodes):
                raise ValueError("job_group_sets must name the job's devices' nodes")
            pairs = [pair for s in self.job_group_sets for pair in combinations(s.nodes, 2)]
            if len(set(pairs).union(nodes)) != len(pairs) + len(nodes):
                raise ValueError("a job group must be named once, in job_groups or in one job group set")
        return self

    @model_serializer(mode="wrap")
    def _without_job_groups_when_none(self, handler: SerializerFunctionWrapHandler) -> object:
        return _without_empty(handler(self), "job_groups", "job_group_sets", "same_data_kept")

    def kept(self) -> SameDataKept:
        """The rule this job was settled by (a leaf from before the field: "larger")."""
        return self.same_data_kept or "larger"

    def job_pairs(self) -> JobPairs:
        """Every job group, from `job_groups` and `job_group_sets`, sorted by nodes."""
        member_of = {d.node_id: d.member for d in self.devices}
        pairs: JobPairs = {g.nodes: (g.members, g.rounds) for g in self.job_groups}
        for group_set in self.job_group_sets:
            for a, b in combinations(group_set.nodes, 2):
                pairs[(a, b)] = ((member_of[a], member_of[b]), group_set.rounds)
        return dict(sorted(pairs.items()))


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


MAX_ROUND_PARTS = 10_000


class RoundLogRecord(CanonicalModel):
    """The body of a ROUND leaf. `valuation` is the method that valued it (`exact`, `sampled`, `first_order`,
    `none`), or empty with `skipped` saying why it was not valued. `groups` are the round's players of more than one
    node (each sorted, ordered by their first node) and `same_data` the similarities its screens reported (sorted by
    nodes): with the updates' values, all a job's settlement reads of the round. Both are left out of the encoding
    when empty, so a leaf from before them keeps its bytes.

    A round too large for one leaf is logged as `parts` ROUND leaves (`split_round_record`), numbered by `part` from
    1, each with the round's header and a consecutive slice of its four lists; `join_round_parts` puts them back
    together. Both are left out of the encoding of a round in one leaf."""

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
    part: int = Field(default=1, ge=1, le=MAX_ROUND_PARTS)
    parts: int = Field(default=1, ge=1, le=MAX_ROUND_PARTS)

    @model_validator(mode="after")
    def _evidence_sorted(self) -> Self:
        if self.part > self.parts:
            raise ValueError("a round's part must be at most its number of parts")
        if any(list(g) != sorted(set(g)) for g in self.groups) or [g[0] for g in self.groups] != sorted(
            {g[0] for g in self.groups}
        ):
            raise ValueError("groups must be sorted node ids, ordered by their first node")
        if [p.nodes for p in self.same_data] != sorted({p.nodes for p in self.same_data}):
            raise ValueError("same_data must be sorted by nodes and unique")
        if self.parts > 1:
            return self  # what a part's evidence names may be in another part: checked once joined
        admitted = {u.node_id for u in self.updates if not u.excluded}
        grouped = [node for group in self.groups for node in group]
        if len(set(grouped)) != len(grouped) or not admitted.issuperset(grouped):
            raise ValueError("groups must name admitted updates' nodes, each in one group at most")
        if not {u.node_id for u in self.updates}.issuperset(n for p in self.same_data for n in p.nodes):
            raise ValueError("same_data must name the round's updates' nodes")
        return self

    @model_serializer(mode="wrap")
    def _without_evidence_when_none(self, handler: SerializerFunctionWrapHandler) -> object:
        dumped = _without_empty(handler(self), "groups", "same_data")
        if isinstance(dumped, dict) and dumped.get("parts") == 1:
            dumped.pop("part")
            dumped.pop("parts")
        return dumped


_ROUND_LISTS = ("updates", "drops", "groups", "same_data")


def split_round_record(record: RoundLogRecord, limit: int = MAX_SIGNED_SIZE) -> tuple[RoundLogRecord, ...]:
    """The ROUND leaves of a round: the record itself when its canonical JSON fits in `limit` bytes, else parts, each
    with the round's header and the next consecutive items of its lists (updates, then drops, groups, same_data)
    that fit. TooLargeError when one item cannot fit a part on its own."""
    if record.parts != 1:
        raise MalformedError("only a whole round is split", job=record.job_id, round=record.round)
    if len(record.canonical_json()) <= limit:
        return (record,)
    bare = {**dict.fromkeys(_ROUND_LISTS, ()), "part": MAX_ROUND_PARTS, "parts": MAX_ROUND_PARTS}
    header = len(record.model_copy(update=bare).canonical_json())
    budget = limit - header - sum(len(f',"{name}":[]') for name in _ROUND_LISTS)
    chunks: list[dict[str, list[object]]] = []
    used = budget  # starts a part at the first item
    dumped = record.model_dump(mode="json")
    for name in _ROUND_LISTS:
        for item, doc in zip(getattr(record, name), dumped[name], strict=True):
            size = len(canonical_text(doc).encode()) + 1
            if size > budget:
                raise TooLargeError("a round's entry does not fit in a leaf", job=record.job_id, list=name, found=size)
            if used + size > budget:
                chunks.append({n: [] for n in _ROUND_LISTS})
                used = 0
            chunks[-1][name].append(item)
            used += size
    if len(chunks) > MAX_ROUND_PARTS:
        raise TooLargeError("a round does not fit in its most parts", job=record.job_id, limit=MAX_ROUND_PARTS)
    parts = tuple(
        record.model_copy(update={**{n: tuple(items) for n, items in chunk.items()}, "part": i, "parts": len(chunks)})
        for i, chunk in enumerate(chunks, start=1)
    )
    if max(len(p.canonical_json()) for p in parts) > limit:  # the sizes above are exact or larger: their check
        raise TooLargeError("a round's part is larger than a leaf", job=record.job_id, limit=limit)
    return parts


def join_round_parts(records: Iterable[RoundLogRecord]) -> list[RoundLogRecord]:
    """The whole rounds of ROUND records (one job's, in any order), ordered by round: a round in one leaf as it is,
    a round in parts joined and checked as a whole. MalformedError when a round comes twice, a part is missing or
    comes twice, or its parts' headers differ."""
    by_round: dict[int, list[RoundLogRecord]] = {}
    for record in records:
        by_round.setdefault(record.round, []).append(record)
    return [_joined(number, parts) for number, parts in sorted(by_round.items())]


def _joined(number: int, records: Sequence[RoundLogRecord]) -> RoundLogRecord:
    first = records[0]
    if sorted(r.part for r in records) != list(range(1, first.parts + 1)):
        raise MalformedError(
            "a round's ROUND leaves are not its parts, each once",
            job=first.job_id, round=number, parts=first.parts, found=sorted(r.part for r in records),
        )  # fmt: skip
    if len(records) == 1:
        return first
    header = {"part", "parts", *_ROUND_LISTS}
    if any(r.model_dump(exclude=header) != first.model_dump(exclude=header) or r.parts != first.parts for r in records):
        raise MalformedError("a round's parts differ in their header", job=first.job_id, round=number)
    ordered = sorted(records, key=lambda r: r.part)
    lists = {name: tuple(item for r in ordered for item in getattr(r, name)) for name in _ROUND_LISTS}
    try:
        return RoundLogRecord(**{**first.model_dump(exclude=header), **lists})
    except ValidationError as error:
        raise MalformedError(
            "a round's parts do not make a round", job=first.job_id, round=number, first=error.errors()[0]["msg"]
        ) from None


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
