"""`midgate agent portfolio`: everything the member earns across the MIDs it belongs to, each line verified against
its own MID's ledger.

Each membership is asked on its own, with its own device key, exactly as `midgate agent statement` asks (a signed
StatementRequest; the answer checked by protocol.ledger_api.verify_statement and against that membership's trusted
checkpoint): nothing sent to one MID names another, and the memberships stay unlinkable (separate keys per MID). Only
verified lines count towards the totals, per currency; a membership whose answer does not check out (a tampered
line, a checkpoint without its witnesses, an inconsistent log) or that cannot be asked is shown with the reason and
adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from edge.agent.ledger_client import ProofUnavailableError
from edge.agent.membership import Membership
from protocol.errors import ProtocolError
from protocol.ledger_api import VerifiedStatement


@dataclass(frozen=True)
class MembershipEarnings:
    mid: str
    member: str
    statement: VerifiedStatement | None
    problem: str = ""
    """Why nothing of this membership counts (empty when its statement verified)."""


def collect(
    memberships: Sequence[Membership], fetch: Callable[[Membership], VerifiedStatement]
) -> list[MembershipEarnings]:
    """Each membership's verified statement (`fetch`: edge.agent.statement.fetch_statement for it), or why not."""
    found = []
    for membership in memberships:
        try:
            found.append(MembershipEarnings(membership.mid, membership.record.member, fetch(membership)))
        except ProofUnavailableError as exc:
            found.append(MembershipEarnings(membership.mid, membership.record.member, None, f"not answered: {exc}"))
        except ProtocolError as exc:
            found.append(MembershipEarnings(membership.mid, membership.record.member, None, f"refused: {exc}"))
    return found


def totals_minor(earnings: Sequence[MembershipEarnings]) -> dict[str, int]:
    """Totals per currency over the verified lines of every membership."""
    totals: dict[str, int] = {}
    for entry in earnings:
        if entry.statement is not None:
            for currency, amount in entry.statement.totals_minor.items():
                totals[currency] = totals.get(currency, 0) + amount
    return totals


def render_portfolio(earnings: Sequence[MembershipEarnings]) -> str:
    """One block per membership (its lines: training settlements and royalty streams), then the totals."""
    out = []
    for entry in earnings:
        if entry.statement is None:
            out.append(f"{entry.mid} (member {entry.member}): NOT COUNTED, {entry.problem}")
            continue
        size = entry.statement.checkpoint.checkpoint.size
        out.append(f"{entry.mid} (member {entry.member}), verified under its witnessed log of size {size}:")
        for line in entry.statement.lines:
            what = f"job {line.job_id}" if line.kind == "settlement" else f"royalty, model {line.model_version}"
            out.append(f"  {what}: {line.amount_minor} {line.currency} minor units (leaf {line.index})")
        if not entry.statement.lines:
            out.append("  no earnings yet")
        for currency, total in sorted(entry.statement.totals_minor.items()):
            out.append(f"  subtotal: {total} {currency} minor units")
    for currency, total in sorted(totals_minor(earnings).items()):
        out.append(f"Total across MIDs: {total} {currency} minor units")
    if not totals_minor(earnings):
        out.append("Total across MIDs: nothing verified yet")
    return "\n".join(out) + "\n"


__all__ = ["MembershipEarnings", "collect", "render_portfolio", "totals_minor"]
