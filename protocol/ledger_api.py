"""What a member's agent reads from its MID's ledger API, and how it checks it: the witness list, and a statement's
settlement and royalty leaves with their inclusion proofs (docs/protocol.md, "Member ledger API").

The coordinator builds these bodies and the agent parses them strictly, trusting nothing it cannot check: every leaf
must be in the log under a checkpoint the MID signed and a quorum of the listed witnesses cosigned, and the lines a
member sees are read from the leaf bytes themselves, never from anything the MID says about them.

A settlement or royalty leaf holds one split record (canonical JSON, `midgate.split.v1`, defined with its arithmetic
in coordinator/royalties/settlement.py). The agent reads only what a statement line shows through `_SplitRecordView`
(unknown fields ignored): the record's kind, id, time, currency, job and model, and the payouts naming its member.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol.checkpoint import VerifiedCheckpoint
from protocol.errors import BadKeyError, MalformedError, ProtocolError
from protocol.identity import VerifierKey
from protocol.leaves import LeafKind, decode_leaf
from protocol.merkle import leaf_hash, verify_inclusion
from protocol.messages import U64, B64Hash, CanonicalModel, Ident, _parse_bounded
from protocol.witness import CosignaturePolicy, CosignatureVerifier

MAX_WITNESSES = 100_000
MAX_WITNESS_LIST_BYTES = 8 << 20
MAX_STATEMENT_LEAVES = 512
"""Leaves in one statement answer; a member with more asks for shorter periods."""
MAX_STATEMENT_BYTES = 64 << 20
MAX_CHECKPOINT_TEXT = 64 * 1024
_MAX_LEAF_B64 = 1_400_000  # a leaf of 1 MiB + header, in base64

CosignatureKeyText = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class WitnessKey(BaseModel):
    """One witness: a device of the MID and its key in the cosignature/v1 role."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    device: Ident
    key: CosignatureKeyText
    """`name+hex(keyid)+base64(0x04 || public key)` (docs/ledger.md): the device key as a witness key."""


class WitnessList(CanonicalModel):
    """`GET /v1/witnesses`: the log's witnesses (the MID's enrolled, unrevoked devices) and the quorum of them whose
    cosignatures make a checkpoint witnessed."""

    v: Literal[1] = 1
    quorum: Annotated[int, Field(ge=1, le=MAX_WITNESSES)]
    witnesses: Annotated[tuple[WitnessKey, ...], Field(min_length=1, max_length=MAX_WITNESSES)]

    @classmethod
    def parse(cls, data: bytes) -> WitnessList:
        return _parse_bounded(cls, data, MAX_WITNESS_LIST_BYTES, "witness list")

    def policy(self) -> CosignaturePolicy:
        """The k-of-n policy this list states; `malformed` for a key that does not parse or a quorum above n."""
        try:
            keys = tuple(CosignatureVerifier.parse(w.key) for w in self.witnesses)
        except BadKeyError as exc:
            raise MalformedError("witness key does not parse", detail=exc.message) from None
        for witness, key in zip(self.witnesses, keys, strict=True):
            if key.name != witness.device:
                raise MalformedError("witness key is named for another device", device=witness.device, key=key.name)
        return CosignaturePolicy(keys, self.quorum)


class KnobPrice(CanonicalModel):
    """What a knob setting means under the MID's current policy (`GET /v1/member/knob-price?knob_milli=N`): the
    member's price per job at that knob, and the range the whole knob spans, in minor units of `currency`."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    policy_version: Annotated[int, Field(ge=1)]
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
    knob_milli: Annotated[int, Field(ge=-1000, le=1000)]
    price_minor: Annotated[int, Field(ge=0)]
    lowest_minor: Annotated[int, Field(ge=0)]
    """The price at knob -1."""
    highest_minor: Annotated[int, Field(ge=0)]
    """The price at knob +1."""
    base_price_minor: Annotated[int, Field(ge=0)]
    """The price at knob 0 (the default)."""

    @classmethod
    def parse(cls, data: bytes) -> KnobPrice:
        return _parse_bounded(cls, data, 4096, "knob price")


class PurposeTerm(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    code: Ident
    dpv: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    """The W3C Data Privacy Vocabulary concept the purpose is (e.g. `dpv:ScientificResearch`)."""
    label: Annotated[str, StringConstraints(max_length=256)]


class PurposeList(CanonicalModel):
    """The purposes a job may name under the MID's policy in force (`GET /v1/member/purposes`): what a member's
    consent chooses from."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    policy_version: Annotated[int, Field(ge=0)]
    purposes: Annotated[tuple[PurposeTerm, ...], Field(max_length=256)]

    @classmethod
    def parse(cls, data: bytes) -> PurposeList:
        return _parse_bounded(cls, data, 256 * 1024, "purpose list")


class ProvenLeaf(BaseModel):
    """One leaf of the log with its RFC 9162 inclusion path under the answer's checkpoint."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    index: U64
    leaf: Annotated[str, StringConstraints(min_length=1, max_length=_MAX_LEAF_B64)]
    """The exact leaf bytes (docs/ledger.md, Leaves), standard base64."""
    path: Annotated[tuple[B64Hash, ...], Field(max_length=64)]


class StatementProof(CanonicalModel):
    """`POST /v1/member/statement`'s answer: every settlement and royalty leaf of the period that pays the member the
    requesting device belongs to, each with its inclusion path under one checkpoint (the latest witnessed one when it
    holds them all)."""

    v: Literal[1] = 1
    mid: Ident
    member: Ident
    period_start_ms: Annotated[int, Field(ge=0)]
    period_end_ms: Annotated[int, Field(ge=0)]
    checkpoint: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHECKPOINT_TEXT)]
    """The C2SP tlog-checkpoint signed note, with the witnesses' cosignatures."""
    leaves: Annotated[tuple[ProvenLeaf, ...], Field(max_length=MAX_STATEMENT_LEAVES)]

    @classmethod
    def parse(cls, data: bytes) -> StatementProof:
        return _parse_bounded(cls, data, MAX_STATEMENT_BYTES, "statement")


@dataclass(frozen=True)
class PaidLine:
    """One payout to the member, as the leaf at `index` records it."""

    index: int
    record_id: str
    record_sha256: str
    kind: str
    job_id: str
    model_version: str
    created_ms: int
    currency: str
    amount_minor: int
    reason: str
    knob_milli: int | None = None
    """The member's knob the record priced it at (the knob in force for the job, kept with the model), None when
    the record does not carry it."""
    price_minor: int | None = None
    """The reservation price that knob gave under the record's policy."""


@dataclass(frozen=True)
class VerifiedStatement:
    checkpoint: VerifiedCheckpoint
    lines: list[PaidLine]

    @property
    def totals_minor(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for line in self.lines:
            totals[line.currency] = totals.get(line.currency, 0) + line.amount_minor
        return totals


def verify_statement(
    proof: StatementProof,
    *,
    mid: str,
    member: str,
    period: tuple[int, int],
    log_vkey: VerifierKey,
    policy: CosignaturePolicy,
) -> VerifiedStatement:
    """Check a statement answer line by line; raises a ProtocolError naming the first leaf that fails.

    The checkpoint must be signed by the log and cosigned by `policy`'s quorum (quorum_not_met); each leaf's path
    must prove its exact bytes at its index (bad_proof / root_mismatch, with `leaf_index`); each leaf must be a
    settlement or royalty record of the period asked for that pays `member` (malformed). Whether the checkpoint is
    consistent with the member's own trusted one is the caller's to check (it needs a consistency proof).
    """
    if proof.mid != mid or proof.member != member:
        raise MalformedError(
            "statement for another MID or member", expected=(mid, member), found=(proof.mid, proof.member)
        )
    if (proof.period_start_ms, proof.period_end_ms) != period:
        raise MalformedError(
            "statement for another period", expected=period, found=(proof.period_start_ms, proof.period_end_ms)
        )
    opened = policy.check(proof.checkpoint.encode(), log_vkey)
    size, root = opened.checkpoint.size, opened.checkpoint.root
    lines: list[PaidLine] = []
    seen: set[int] = set()
    for item in proof.leaves:
        if item.index in seen:
            raise MalformedError("a leaf appears twice in the statement", leaf_index=item.index)
        seen.add(item.index)
        leaf = _b64(item.leaf, "leaf")
        try:
            verify_inclusion(item.index, size, leaf_hash(leaf), [_b64(h, "path") for h in item.path], root)
            lines.extend(paid_lines(item.index, leaf, member, period))
        except ProtocolError as exc:
            exc.details["leaf_index"] = item.index
            raise
    return VerifiedStatement(opened, lines)


class _PayoutView(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    member: str
    amount_minor: int
    reason: str
    price_minor: int | None = None


class _MemberView(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    member: str
    knob_milli: int


class _AttributionView(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    job_id: str
    model_version: str
    members: list[_MemberView] = []


class _InputsView(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    kind: Literal["settlement", "royalty"]
    record_id: str
    created_ms: int
    currency: str
    attribution: _AttributionView


class _SplitRecordView(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    schema_id: Literal["midgate.split.v1"]
    inputs: _InputsView
    payouts: list[_PayoutView]


_LEAF_KIND = {"settlement": LeafKind.SETTLEMENT, "royalty": LeafKind.ROYALTY}


def paid_lines(index: int, leaf: bytes, member: str, period: tuple[int, int]) -> list[PaidLine]:
    """The payouts to `member` the leaf at `index` records; `malformed` unless it is a settlement or royalty record
    created in [period) that pays the member."""
    decoded = decode_leaf(leaf)
    if decoded.kind not in (LeafKind.SETTLEMENT, LeafKind.ROYALTY):
        raise MalformedError("leaf is not a settlement or royalty record", kind=decoded.kind.name.lower())
    try:
        record = _SplitRecordView.model_validate_json(decoded.signed)
    except ValidationError as exc:
        raise MalformedError("leaf is not a split record", errors=exc.error_count()) from None
    inputs = record.inputs
    if _LEAF_KIND[inputs.kind] is not decoded.kind:
        raise MalformedError("record kind differs from its leaf kind", record=inputs.kind, leaf=decoded.kind.name)
    if not period[0] <= inputs.created_ms < period[1]:
        raise MalformedError("record lies outside the period asked for", created_ms=inputs.created_ms)
    digest = hashlib.sha256(decoded.signed).hexdigest()
    knobs = {m.member: m.knob_milli for m in inputs.attribution.members}
    lines = [
        PaidLine(
            index=index,
            record_id=inputs.record_id,
            record_sha256=digest,
            kind=inputs.kind,
            job_id=inputs.attribution.job_id,
            model_version=inputs.attribution.model_version,
            created_ms=inputs.created_ms,
            currency=inputs.currency,
            amount_minor=payout.amount_minor,
            reason=payout.reason,
            knob_milli=knobs.get(member),
            price_minor=payout.price_minor,
        )
        for payout in record.payouts
        if payout.member == member
    ]
    if not lines:
        raise MalformedError("record does not pay this member", record_id=inputs.record_id)
    return lines


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise MalformedError(f"{what} is not valid base64") from None


__all__ = [
    "MAX_STATEMENT_LEAVES",
    "KnobPrice",
    "PaidLine",
    "ProvenLeaf",
    "PurposeList",
    "PurposeTerm",
    "StatementProof",
    "VerifiedStatement",
    "WitnessKey",
    "WitnessList",
    "paid_lines",
    "verify_statement",
]
