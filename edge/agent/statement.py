"""`midgate agent statement`: the member's earnings, fetched from the MID and verified on the member's own device.

The device signs a StatementRequest (a fresh nonce, the period, its own key); the MID answers with every settlement and
royalty leaf of the period that pays the member, each with its inclusion path under one checkpoint. Before a line is
printed the agent checks (protocol.ledger_api.verify_statement): the checkpoint is the MID's and carries the quorum
of witness cosignatures the MID's witness list states; every leaf is in the log at its index; every line is read from
the leaf bytes and pays this member; and then the checkpoint is consistent with the agent's own trusted checkpoint
(a consistency proof). One leaf that fails refuses the whole statement, naming the leaf.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from edge.agent.ledger_client import LedgerClient
from edge.agent.ledger_view import LedgerView
from edge.agent.membership import Membership
from edge.agent.outbox import Outbox
from protocol.ledger_api import VerifiedStatement, verify_statement
from protocol.messages import StatementRequest


def fetch_statement(
    membership: Membership,
    client: LedgerClient,
    trusted_note: bytes | None,
    period: tuple[int, int],
    now_ms: int,
) -> VerifiedStatement:
    """The member's verified statement for [period); raises a ProtocolError for anything that does not check out,
    ProofUnavailableError (RefusedByMidError) when the MID cannot be asked or refuses."""
    request = StatementRequest(
        mid=membership.mid,
        device=membership.device,
        period_start_ms=period[0],
        period_end_ms=period[1],
        nonce=secrets.token_hex(16),
        issued_ms=now_ms,
    ).seal(membership.key)
    proof = client.statement(request)
    policy = client.witnesses().policy()
    verified = verify_statement(
        proof,
        mid=membership.mid,
        member=membership.record.member,
        period=period,
        log_vkey=membership.mid_key,
        policy=policy,
    )
    view = LedgerView(membership.mid_key, membership.key.key_id.hex(), client.consistency, trusted_note)
    view.check_checkpoint(verified.checkpoint)
    return verified


def fetch_membership_statement(
    membership: Membership, outbox_max_bytes: int, period: tuple[int, int], now_ms: int
) -> VerifiedStatement:
    """`fetch_statement` against the MID the membership names, checked against the agent's own trusted checkpoint
    (kept in the membership's outbox): what `agent statement` and the member page both ask."""
    outbox = Outbox(membership.outbox_path, outbox_max_bytes)
    try:
        trusted = outbox.get_meta("trusted_checkpoint")
    finally:
        outbox.close()
    client = LedgerClient(membership.record.enrolment_url)
    return fetch_statement(membership, client, trusted, period, now_ms)


@dataclass(frozen=True)
class StatementRow:
    """One payout line as the member reads it, from one verified leaf."""

    day: str
    what: str
    amount_minor: int
    currency: str
    reason: str
    record_id: str
    index: int
    knob: str = "-"
    """The knob in force for the job the line pays for (`+0.500`) and the price it gave, as the record holds them."""


@dataclass(frozen=True)
class StatementView:
    """What the member is shown, on the terminal (`render_statement`) and on the member page
    (edge/agent/member_page.py): both render this one view, so their numbers cannot differ."""

    mid: str
    member: str
    checkpoint_size: int
    rows: list[StatementRow]
    totals_minor: list[tuple[str, int]]
    """(currency, total), sorted by currency."""


def statement_view(mid: str, member: str, statement: VerifiedStatement) -> StatementView:
    rows = [
        StatementRow(
            _day(line.created_ms),
            f"job {line.job_id}" if line.kind == "settlement" else f"model {line.model_version}",
            line.amount_minor,
            line.currency,
            line.reason,
            line.record_id,
            line.index,
            knob_text(line.knob_milli, line.price_minor, line.currency),
        )
        for line in statement.lines
    ]
    return StatementView(
        mid, member, statement.checkpoint.checkpoint.size, rows, sorted(statement.totals_minor.items())
    )


def render_statement(mid: str, member: str, statement: VerifiedStatement) -> str:
    """The plain statement a member reads: one line per payout, then the totals."""
    view = statement_view(mid, member, statement)
    out = [f"Statement for member {member} of {mid}, verified under the witnessed log of size {view.checkpoint_size}"]
    for row in view.rows:
        out.append(
            f"  {row.day}  {row.what}: {row.amount_minor} {row.currency} minor units"
            f" ({row.reason}; {row.knob}; record {row.record_id}, leaf {row.index})"
        )
    if not view.rows:
        out.append("  no earnings in this period")
    for currency, total in view.totals_minor:
        out.append(f"Total: {total} {currency} minor units")
    return "\n".join(out) + "\n"


def knob_text(knob_milli: int | None, price_minor: int | None, currency: str) -> str:
    """`knob +0.500, price 1414 EUR`: the knob a line was priced at, or `knob not recorded`."""
    if knob_milli is None:
        return "knob not recorded"
    price = "" if price_minor is None else f", price {price_minor} {currency}"
    return f"knob {knob_milli / 1000:+.3f}{price}"


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()
