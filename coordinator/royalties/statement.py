"""A member's statement for a period: what they earned, from which jobs and models, and the records that prove it.

Each line names the record by its SHA-256 (the bytes the ledger holds as a settlement or royalty leaf), so the
member can fetch the record, recompute it with `recompute_settlement`, and check its inclusion proof.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from coordinator.royalties.settlement import decode_record, record_hash
from protocol.errors import MalformedError


class StatementLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    record_id: str
    record_sha256: str
    kind: str
    job_id: str
    model_version: str
    created_ms: int
    currency: str
    amount_minor: int
    reason: str
    knob_milli: int
    """The member's knob the record priced it at: the knob in force when the job started, kept with the model."""
    price_minor: int
    """The reservation price that knob gave under the record's policy."""


class MemberStatement(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    member: str
    period_start_ms: int
    period_end_ms: int
    lines: list[StatementLine]
    totals_minor: dict[str, int]


def member_statement(
    member: str, records: Iterable[bytes], *, period_start_ms: int, period_end_ms: int
) -> MemberStatement:
    """Lines for every record created in [period_start_ms, period_end_ms) that names the member, oldest first."""
    if period_end_ms < period_start_ms:
        raise MalformedError("period ends before it starts", start_ms=period_start_ms, end_ms=period_end_ms)
    lines: list[StatementLine] = []
    for record_bytes in records:
        record = decode_record(record_bytes)
        inputs = record.inputs
        if not period_start_ms <= inputs.created_ms < period_end_ms:
            continue
        knobs = {m.member: m.knob_milli for m in inputs.attribution.members}
        for payout in record.payouts:
            if payout.member == member:
                lines.append(
                    StatementLine(
                        record_id=inputs.record_id,
                        record_sha256=record_hash(record_bytes),
                        kind=inputs.kind,
                        job_id=inputs.attribution.job_id,
                        model_version=inputs.attribution.model_version,
                        created_ms=inputs.created_ms,
                        currency=inputs.currency,
                        amount_minor=payout.amount_minor,
                        reason=payout.reason,
                        knob_milli=knobs[member],
                        price_minor=payout.price_minor,
                    )
                )
    lines.sort(key=lambda line: (line.created_ms, line.record_id))
    totals: dict[str, int] = {}
    for line in lines:
        totals[line.currency] = totals.get(line.currency, 0) + line.amount_minor
    return MemberStatement(
        member=member, period_start_ms=period_start_ms, period_end_ms=period_end_ms, lines=lines, totals_minor=totals
    )


def render_statement(statement: MemberStatement) -> str:
    """The one-page plain-text statement a member reads."""
    out = [f"Statement for {statement.member}, ms {statement.period_start_ms} to {statement.period_end_ms}"]
    for line in statement.lines:
        what = "job" if line.kind == "settlement" else "model"
        name = line.job_id if line.kind == "settlement" else line.model_version
        out.append(
            f"  {line.created_ms}  {what} {name}: {line.amount_minor} {line.currency} minor units"
            f" ({line.reason}; knob {line.knob_milli / 1000:+.3f}, price {line.price_minor} {line.currency};"
            f" record {line.record_id}, sha256 {line.record_sha256[:16]}...)"
        )
    if not statement.lines:
        out.append("  no earnings in this period")
    for currency, total in sorted(statement.totals_minor.items()):
        out.append(f"Total: {total} {currency} minor units")
    return "\n".join(out) + "\n"
