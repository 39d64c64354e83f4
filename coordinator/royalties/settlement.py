"""Settlement of a job payment and royalty splits of later model revenue, as self-contained records.

A record holds every input (policy, attribution vector, knobs, screens, payment) and every output (fee, payouts).
The outputs are a pure integer function of the inputs, so `recompute_settlement(record_bytes)` reproduces a record
byte for byte from the record alone; that is what lets a member audit their pay from the ledger.

Split of a payment P under policy fee f (basis points):
- fee = floor(P * f / 10000) (rounding always favours members, so the fee never exceeds the cap);
- pool = P - fee; eligible members have a positive attributed value and were not proven data-free in most rounds
  (the policy's rule for screened members, `_payout_reason`); member weight = value_units * reservation price (value
  earns, the knob scales what value is worth);
- part_i = floor(pool * w_i / W), and the pool - sum(parts) leftover minor units go one each to the largest
  remainders pool * w_i mod W, ties broken by member id (largest-remainder / Hamilton method), so the parts sum
  exactly to the pool; with no eligible member the pool is unallocated (returned to the payer);
- fee + sum(parts) + unallocated = P exactly.

A royalty record also holds the departures of the model's members who left (`departed`: the leave leaf and when it
was logged) when the model's policy says royalties do not continue after a departure: a departed member then has
weight 0 (reason `royalties_ended`) in revenue reported `leave_notice_days` or more after its leave, so its share goes
to the model's other members. The record alone still recomputes; the leave leaf it names proves the departure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from coordinator.royalties.policy import BPS, KNOB_MAX_MILLI, KNOB_MIN_MILLI, RoyaltyPolicy, reservation_price
from protocol.errors import MalformedError, SettlementMismatchError, TooLargeError
from protocol.leaves import MAX_SIGNED_SIZE

SCHEMA = "midgate.split.v1"
# A record is stored verbatim as the body of one ledger leaf, so it obeys the leaf size limit (about 5,000 members).
MAX_RECORD_BYTES = MAX_SIGNED_SIZE
_ID_PATTERN = r"^[A-Za-z0-9._:\-]{1,128}$"

PayoutReason = Literal["paid", "no_positive_value", "screened", "royalties_ended"]
DAY_MS = 86_400_000

DATA_FREE_PROOFS = frozenset({"data_free", "random_weights", "stale_update", "zero_update"})
"""The screens that prove an update was not trained on data: coordinator.attribution.screens.DATA_FREE_PROOFS by
name (this module is imported without numpy, so it does not import the screens)."""


class MemberAttribution(BaseModel):
    """One member's inputs to a split: accumulated value (nano-units), knob, and what the screens recorded."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    member: str = Field(pattern=_ID_PATTERN)
    value_units: int
    knob_milli: int = Field(ge=KNOB_MIN_MILLI, le=KNOB_MAX_MILLI)
    rounds: int = Field(ge=0)
    excluded_rounds: int = Field(ge=0)
    screens: list[str] = Field(default_factory=list, max_length=16)

    @field_validator("screens")
    @classmethod
    def _screens_sorted_unique(cls, screens: list[str]) -> list[str]:
        if screens != sorted(set(screens)):
            raise MalformedError("screens must be sorted and unique", screens=screens)
        return screens


class ModelAttribution(BaseModel):
    """The attribution a model version keeps for life: who it came from, under which policy, at which knobs."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    job_id: str = Field(pattern=_ID_PATTERN)
    model_version: str = Field(pattern=_ID_PATTERN)
    policy: RoyaltyPolicy
    members: list[MemberAttribution] = Field(max_length=100_000)

    @model_validator(mode="after")
    def _members_sorted_unique(self) -> Self:
        names = [m.member for m in self.members]
        if names != sorted(set(names)):
            raise MalformedError("members must be sorted by id and unique", members=len(names))
        return self


class DepartedMember(BaseModel):
    """A member of the model who left the MID: its logged LeaveNotice's leaf index and when the MID logged it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    member: str = Field(pattern=_ID_PATTERN)
    leave_leaf_index: int = Field(ge=0)
    left_ms: int = Field(ge=0)

    def royalties_ended(self, policy: RoyaltyPolicy, created_ms: int) -> bool:
        """Whether revenue reported at `created_ms` no longer pays this member under the model's `policy`."""
        return not policy.royalties_continue and created_ms >= self.left_ms + policy.leave_notice_days * DAY_MS


class SplitInputs(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal["settlement", "royalty"]
    record_id: str = Field(pattern=_ID_PATTERN)
    created_ms: int = Field(ge=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    payment_minor: int = Field(ge=0, le=10**15)
    attribution: ModelAttribution
    departed: list[DepartedMember] = Field(default_factory=list, max_length=100_000)
    """Departed members of the model whose royalties the policy may end (royalty records only; left out when
    empty, so records made before it existed keep their bytes)."""

    @model_validator(mode="after")
    def _departed_of_a_royalty(self) -> Self:
        names = [d.member for d in self.departed]
        if names != sorted(set(names)):
            raise MalformedError("departed members must be sorted by id and unique", departed=len(names))
        if names and self.kind != "royalty":
            raise MalformedError("only a royalty record names departed members", kind=self.kind)
        return self

    @model_serializer(mode="wrap")
    def _without_departed_when_none(self, handler: SerializerFunctionWrapHandler) -> object:
        dumped = handler(self)
        if isinstance(dumped, dict) and not self.departed:
            dumped.pop("departed", None)
        return dumped


class MemberPayout(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    member: str = Field(pattern=_ID_PATTERN)
    price_minor: int = Field(ge=0)
    weight: int = Field(ge=0)
    amount_minor: int = Field(ge=0)
    reason: PayoutReason


class SplitRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_id: Literal["midgate.split.v1"] = "midgate.split.v1"
    inputs: SplitInputs
    fee_minor: int = Field(ge=0)
    pool_minor: int = Field(ge=0)
    unallocated_minor: int = Field(ge=0)
    payouts: list[MemberPayout]


def largest_remainder(total: int, weights: Sequence[int], names: Sequence[str]) -> list[int]:
    """Split `total` minor units in proportion to non-negative integer `weights`; parts sum exactly to `total`.
    Requires sum(weights) > 0; ties in the remainder go to the smaller name."""
    weight_sum = sum(weights)
    parts = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    leftover = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], names[i]))
    for i in order[:leftover]:
        parts[i] += 1
    return parts


def _payout_reason(member: MemberAttribution, policy: RoyaltyPolicy) -> PayoutReason:
    """A member excluded in most of its rounds earns nothing when the policy says so: under `data_free_earns_nothing`
    only if a data-free proof is among its screens (a consensus screen proves nothing about data, and such a member
    keeps the value of its admitted rounds: excluded rounds are valued 0 anyway)."""
    mostly_excluded = 2 * member.excluded_rounds > member.rounds
    if mostly_excluded and policy.majority_excluded_earns_nothing:
        return "screened"
    if mostly_excluded and policy.data_free_earns_nothing and DATA_FREE_PROOFS.intersection(member.screens):
        return "screened"
    if member.value_units <= 0:
        return "no_positive_value"
    return "paid"


def compute_split(inputs: SplitInputs) -> SplitRecord:
    """The record of splitting `inputs.payment_minor` by `inputs.attribution`; pure and integer-only."""
    policy = inputs.attribution.policy
    payment = inputs.payment_minor
    fee = payment * policy.fee_bps // BPS
    pool = payment - fee
    members = inputs.attribution.members
    prices = [reservation_price(m.knob_milli, policy.knob) for m in members]
    ended = {d.member for d in inputs.departed if d.royalties_ended(policy, inputs.created_ms)}
    reasons: list[PayoutReason] = [
        "royalties_ended" if m.member in ended else _payout_reason(m, policy) for m in members
    ]
    weights = [
        m.value_units * price if reason == "paid" else 0
        for m, price, reason in zip(members, prices, reasons, strict=True)
    ]
    if sum(weights) > 0:
        amounts = largest_remainder(pool, weights, [m.member for m in members])
        unallocated = 0
    else:
        amounts = [0] * len(members)
        unallocated = pool
    payouts = [
        MemberPayout(member=m.member, price_minor=price, weight=w, amount_minor=a, reason=r)
        for m, price, w, a, r in zip(members, prices, weights, amounts, reasons, strict=True)
    ]
    return SplitRecord(inputs=inputs, fee_minor=fee, pool_minor=pool, unallocated_minor=unallocated, payouts=payouts)


def encode_record(record: SplitRecord) -> bytes:
    """Canonical bytes: JSON with sorted keys, no insignificant whitespace, ASCII only, integers only."""
    return json.dumps(record.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(record_bytes: bytes) -> str:
    """SHA-256 of a record's canonical bytes, hex; what statements and ledger leaves name a record by."""
    return hashlib.sha256(record_bytes).hexdigest()


def decode_record(record_bytes: bytes) -> SplitRecord:
    """Parse a stored record; size is checked before parsing, and the bytes must be canonical."""
    if len(record_bytes) > MAX_RECORD_BYTES:
        raise TooLargeError("split record too large", size=len(record_bytes), limit=MAX_RECORD_BYTES)
    try:
        record = SplitRecord.model_validate_json(record_bytes, strict=True, context={"stored": True})
    except ValidationError as error:
        raise MalformedError("not a split record", errors=error.error_count(), first=error.errors()[0]["msg"]) from None
    if encode_record(record) != record_bytes:
        raise MalformedError("split record is not in canonical encoding", size=len(record_bytes))
    return record


def recompute_settlement(record_bytes: bytes) -> bytes:
    """Recompute a settlement or royalty record from the inputs it holds; returns the canonical record bytes."""
    return encode_record(compute_split(decode_record(record_bytes).inputs))


def verify_settlement(record_bytes: bytes) -> SplitRecord:
    """The record, if its stored outputs are exactly what its inputs compute; SettlementMismatchError otherwise."""
    stored = decode_record(record_bytes)
    recomputed = compute_split(stored.inputs)
    if recomputed != stored:
        raise SettlementMismatchError(
            "stored outputs differ from the recomputation",
            record_id=stored.inputs.record_id,
            stored_hash=record_hash(record_bytes),
            recomputed_hash=record_hash(encode_record(recomputed)),
        )
    return stored


def settle_job(
    attribution: ModelAttribution, payment_minor: int, *, record_id: str, created_ms: int, currency: str
) -> bytes:
    """The settlement record (canonical bytes) of a job's payment."""
    inputs = SplitInputs(
        kind="settlement",
        record_id=record_id,
        created_ms=created_ms,
        currency=currency,
        payment_minor=payment_minor,
        attribution=attribution,
    )
    return encode_record(compute_split(inputs))


def split_royalty(
    attribution: ModelAttribution,
    revenue_minor: int,
    *,
    record_id: str,
    created_ms: int,
    currency: str,
    departed: Sequence[DepartedMember] = (),
) -> bytes:
    """The royalty record of later revenue from a model version: split by the attribution stored with the model
    (its policy version and knobs as they were), so members who have since left are paid too, unless the model's
    policy ends a departed member's royalties (`departed`: the departures among the model's members; recorded only
    when the policy can end royalties)."""
    named = {m.member for m in attribution.members}
    kept = (
        []
        if attribution.policy.royalties_continue
        else sorted((d for d in departed if d.member in named), key=lambda d: d.member)
    )
    inputs = SplitInputs(
        kind="royalty",
        record_id=record_id,
        created_ms=created_ms,
        currency=currency,
        payment_minor=revenue_minor,
        attribution=attribution,
        departed=kept,
    )
    return encode_record(compute_split(inputs))
