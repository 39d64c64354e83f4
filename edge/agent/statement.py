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
from datetime import UTC, datetime

from edge.agent.ledger_client import LedgerClient
from edge.agent.ledger_view import LedgerView
from edge.agent.membership import Membership
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


def render_statement(mid: str, member: str, statement: VerifiedStatement) -> str:
    """The plain statement a member reads: one line per payout, then the totals."""
    checkpoint = statement.checkpoint.checkpoint
    out = [f"Statement for member {member} of {mid}, verified under the witnessed log of size {checkpoint.size}"]
    for line in statement.lines:
        what = f"job {line.job_id}" if line.kind == "settlement" else f"model {line.model_version}"
        out.append(
            f"  {_day(line.created_ms)}  {what}: {line.amount_minor} {line.currency} minor units"
            f" ({line.reason}; record {line.record_id}, leaf {line.index})"
        )
    if not statement.lines:
        out.append("  no earnings in this period")
    for currency, total in sorted(statement.totals_minor.items()):
        out.append(f"Total: {total} {currency} minor units")
    return "\n".join(out) + "\n"


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()
