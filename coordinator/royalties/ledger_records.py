"""Settlement and royalty records in the transparency ledger.

A record's canonical bytes are the body of a SETTLEMENT or ROYALTY leaf, verbatim. The MID's signed checkpoint over
the log commits to them, so a receipt (tlog-proof) for the leaf is the coordinator's signature on the record, and
anyone holding the ledger can recompute the split from the leaf alone. A model's attribution vector lives in its
settlement leaf; later revenue for that model is split by looking it up there, so members who have left are paid
from what the log says, not from the registry's current membership.

These functions do blocking SQLite reads and writes: async callers run them with asyncio.to_thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from coordinator.ledger.store import LedgerReader, LedgerStore
from coordinator.registry.member_choices import Departure
from coordinator.royalties.attribution_record import job_attribution
from coordinator.royalties.policy import RoyaltyPolicy
from coordinator.royalties.settlement import (
    DepartedMember,
    ModelAttribution,
    SplitRecord,
    compute_split,
    decode_record,
    encode_record,
    record_hash,
    settle_job,
    split_royalty,
    verify_settlement,
)
from coordinator.royalties.statement import MemberStatement, member_statement
from protocol.errors import MalformedError, ProtocolError, UnknownModelError
from protocol.job_log import JobLogRecord
from protocol.leaves import Leaf, LeafKind, decode_leaf

_KINDS = {"settlement": LeafKind.SETTLEMENT, "royalty": LeafKind.ROYALTY}


@dataclass(frozen=True)
class LedgerSplit:
    index: int
    record_bytes: bytes
    record: SplitRecord


@dataclass(frozen=True)
class Recomputation:
    index: int
    record_id: str
    stored_sha256: str
    recomputed_sha256: str

    @property
    def matches(self) -> bool:
        return self.stored_sha256 == self.recomputed_sha256


def append_split(store: LedgerStore, record_bytes: bytes) -> int:
    """Append a settlement or royalty record as its typed leaf; the record must reproduce itself. Returns the index."""
    record = verify_settlement(record_bytes)
    if any(s.record.inputs.record_id == record.inputs.record_id for s in iter_splits(store)):
        raise MalformedError("record id already in the ledger", record_id=record.inputs.record_id)
    return store.append_leaves([Leaf(_KINDS[record.inputs.kind], record_bytes)]).first_index


def iter_splits(reader: LedgerReader, start: int = 0) -> Iterator[LedgerSplit]:
    """Every settlement and royalty leaf from index `start` on, in log order. A leaf of those kinds that is not a
    valid record raises."""
    for index, data in reader.leaves(start, reader.size):
        leaf = decode_leaf(data)
        if leaf.kind in (LeafKind.SETTLEMENT, LeafKind.ROYALTY):
            try:
                record = decode_record(leaf.signed)
            except ProtocolError as error:
                raise MalformedError("ledger leaf is not a split record", index=index, cause=str(error)) from None
            yield LedgerSplit(index, leaf.signed, record)


def find_split(reader: LedgerReader, record_id: str) -> LedgerSplit:
    """The settlement or royalty leaf holding `record_id`."""
    for split in iter_splits(reader):
        if split.record.inputs.record_id == record_id:
            return split
    raise MalformedError("no settlement or royalty record with this id", record_id=record_id, size=reader.size)


def recompute_from_ledger(reader: LedgerReader, record_id: str) -> Recomputation:
    """Recompute a stored record from its own inputs and compare hashes (the record is never trusted for outputs)."""
    split = find_split(reader, record_id)
    recomputed = encode_record(compute_split(split.record.inputs))
    return Recomputation(split.index, record_id, record_hash(split.record_bytes), record_hash(recomputed))


def model_attribution_from_ledger(reader: LedgerReader, model_version: str) -> ModelAttribution:
    """The attribution stored with a model version's job settlement; UnknownModelError when no settlement names it."""
    for split in iter_splits(reader):
        inputs = split.record.inputs
        if inputs.kind == "settlement" and inputs.attribution.model_version == model_version:
            return inputs.attribution
    raise UnknownModelError("no settlement for this model version", model_version=model_version)


def settlement_record_id(job_id: str) -> str:
    """The record id of a job's settlement: one per job, so the ledger itself refuses a second one."""
    return f"settlement-{job_id}"


def settle_logged_job(
    store: LedgerStore,
    job: JobLogRecord,
    payment_minor: int,
    *,
    currency: str,
    created_ms: int,
    policy: RoyaltyPolicy,
    knobs_milli: Mapping[str, int] | None = None,
) -> int:
    """Settle the buyer's payment for a logged, completed job under `policy` (fee floored, at most the policy's cap;
    the rest to members by the JOB leaf's attribution) and append the SETTLEMENT leaf; returns its index."""
    attribution = job_attribution(job, knobs_milli or {}, policy)
    record_bytes = settle_job(
        attribution, payment_minor, record_id=settlement_record_id(job.job_id), created_ms=created_ms, currency=currency
    )
    return append_split(store, record_bytes)


def departed_members(departures: Iterable[Departure]) -> list[DepartedMember]:
    """The registry's departures (one per revoked device) as one DepartedMember per member: its first logged leave."""
    first: dict[str, Departure] = {}
    for departure in departures:
        kept = first.get(departure.member_id)
        if kept is None or departure.leaf_index < kept.leaf_index:
            first[departure.member_id] = departure
    return [
        DepartedMember(member=d.member_id, leave_leaf_index=d.leaf_index, left_ms=d.left_ms)
        for d in sorted(first.values(), key=lambda d: d.member_id)
    ]


def report_revenue(
    store: LedgerStore,
    model_version: str,
    revenue_minor: int,
    *,
    record_id: str,
    created_ms: int,
    currency: str,
    departed: Sequence[DepartedMember] = (),
) -> int:
    """Split revenue a buyer reports for a model by the model's stored attribution and log it; returns the index.
    `departed`: the MID's departed members (`departed_members(registry.departures().values())`); the model's policy
    decides whether their royalties end (settlement.split_royalty)."""
    attribution = model_attribution_from_ledger(store, model_version)
    record_bytes = split_royalty(
        attribution, revenue_minor, record_id=record_id, created_ms=created_ms, currency=currency, departed=departed
    )
    return append_split(store, record_bytes)


@dataclass(frozen=True)
class LedgerStatement:
    """A member statement plus, per record id, the tlog-proof receipt of the leaf that holds the record."""

    statement: MemberStatement
    receipts: dict[str, str]


def statement_from_ledger(
    reader: LedgerReader, member: str, *, period_start_ms: int, period_end_ms: int
) -> LedgerStatement:
    splits = list(iter_splits(reader))
    statement = member_statement(
        member, [s.record_bytes for s in splits], period_start_ms=period_start_ms, period_end_ms=period_end_ms
    )
    wanted = {line.record_id for line in statement.lines}
    receipts = {
        s.record.inputs.record_id: reader.receipt(s.index) for s in splits if s.record.inputs.record_id in wanted
    }
    return LedgerStatement(statement, receipts)
