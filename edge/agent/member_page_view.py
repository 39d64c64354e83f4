"""What the member page shows (edge.agent.member_page serves it): for every MID the agent belongs to, the statement,
the knob and the consent, the receipts it kept and whether they verify, and the earnings over time.

Every number comes from the same code as the member's commands: the statement is fetched and verified by
`fetch_membership_statement` and laid out by `statement_view`, exactly as `midgate agent statement` prints it; the
receipts are checked by `verify_membership_receipts` against the witnessed log, as `agent receipts --verify` does;
the knob and consent lines are the very lines `agent knob get` and `agent consent show` print
(edge.agent.controls.shown), read-only: the page shows them, the commands change them.
Nothing is cached: each visit asks the MID again, signed with the device key, and verifies on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from edge.agent.config import AgentSettings
from edge.agent.controls.shown import consent_line, knob_line
from edge.agent.controls.state import MemberControlError
from edge.agent.ledger_client import ProofUnavailableError
from edge.agent.membership import Membership
from edge.agent.receipts import MembershipReceipts, ReceiptStatus, verify_membership_receipts
from edge.agent.statement import StatementView, fetch_membership_statement, statement_view
from protocol.errors import ProtocolError
from protocol.messages import MAX_TIME_MS, MIN_TIME_MS
from protocol.svg_charts import Series, data_table, escape, line_chart, page


@dataclass
class MembershipPage:
    """What one membership's section shows: its statement (or why there is none) and its receipts."""

    membership: Membership
    statement: StatementView | None
    statement_problem: str
    receipts: MembershipReceipts
    knob: str = ""
    """What `agent knob get` prints for this membership (or why the member file cannot be read)."""
    consent: str = ""
    """What `agent consent show` prints for this membership (or why the member file cannot be read)."""


def gather(settings: AgentSettings, memberships: list[Membership], now_ms: int) -> list[MembershipPage]:
    """Ask each MID for the member's statement over all time and check the receipts kept (blocking: network and
    SQLite; call from a worker thread)."""
    found = []
    for m in memberships:
        view, problem = None, ""
        try:
            verified = fetch_membership_statement(m, settings.outbox_max_bytes, (MIN_TIME_MS, MAX_TIME_MS), now_ms)
            view = statement_view(m.mid, m.record.member, verified)
        except ProofUnavailableError as exc:
            problem = f"no statement: {exc}"
        except ProtocolError as exc:
            problem = f"statement refused: {exc}"
        receipts = verify_membership_receipts(m, settings.outbox_max_bytes, True)
        found.append(MembershipPage(m, view, problem, receipts, *choices(m)))
    return found


def choices(m: Membership) -> tuple[str, str]:
    """The knob and consent lines the member's commands print; a member file that cannot be trusted is said."""
    try:
        return knob_line(m.directory, m.record.enrolment_url), consent_line(m.directory)
    except MemberControlError as exc:
        said = f"{m.directory.name}: member file unusable: {exc}"
        return said, said


def statement_section(view: StatementView) -> str:
    rows = [[r.day, r.what, r.amount_minor, r.currency, r.reason, r.knob, r.record_id, r.index] for r in view.rows]
    table = data_table(
        f"Statement for member {view.member} of {view.mid}, verified under the witnessed log of size "
        f"{view.checkpoint_size}",
        ["day", "for", "amount (minor units)", "currency", "reason", "knob", "record", "leaf"],
        rows,
        numeric_from=2,
    )
    totals = data_table("Totals", ["currency", "total (minor units)"], [list(t) for t in view.totals_minor])
    return table + "\n" + totals


def earnings_chart(view: StatementView, chart_id: str) -> str:
    """Cumulative earnings per currency, one point per payout line, over days since the first."""
    series = []
    for currency, _ in view.totals_minor:
        rows = [r for r in view.rows if r.currency == currency]
        days = [datetime.fromisoformat(r.day).replace(tzinfo=UTC).timestamp() / 86400 for r in rows]
        running, points = 0, []
        for day, row in zip(days, rows, strict=True):
            running += row.amount_minor
            points.append((day - days[0], float(running)))
        series.append(Series(f"{currency} earned so far", tuple(points)))
    return line_chart(
        "Earnings over time",
        series,
        x_label="days since the first payout",
        y_label="minor units",
        desc="The member's cumulative earnings after each verified payout line; the statement table lists each line.",
        chart_id=chart_id,
        y_floor=0.0,
    )


def receipts_section(receipts: MembershipReceipts) -> str:
    counts: dict[str, int] = {}
    for check in receipts.checks:
        counts[str(check.status)] = counts.get(str(check.status), 0) + 1
    refused = counts.get(str(ReceiptStatus.REFUSED), 0)
    caption = f"Receipts kept: {len(receipts.checks)}"
    if receipts.witnessed_size is not None:
        caption += f"; latest witnessed checkpoint: size {receipts.witnessed_size}"
    table = data_table(caption, ["status", "receipts"], sorted(counts.items()))
    verdict = (
        '<p class="error" role="alert">Some receipts did not verify.</p>'
        if refused or receipts.problems
        else f"<p>Every kept receipt verified on this device ({len(receipts.checks)}).</p>"
    )
    problems = "".join(f'<p class="error" role="alert">{escape(p)}</p>' for p in receipts.problems)
    return verdict + problems + table


def choices_section(p: MembershipPage) -> str:
    return (
        f'<p>Knob (<code>midgate agent knob get</code>):</p><pre class="knob">{escape(p.knob)}</pre>\n'
        f'<p>Consent (<code>midgate agent consent show</code>):</p><pre class="consent">{escape(p.consent)}</pre>\n'
        "<p>Change them with <code>midgate agent knob set</code> and <code>midgate agent consent allow|deny</code>."
        "</p>"
    )


def render_member_page(pages: list[MembershipPage], now_ms: int) -> str:
    parts = [
        "<h1>Your midgate agent</h1>",
        f'<p class="muted">Checked on this device at {escape(_when(now_ms))}: each statement line is verified in '
        "the MID's log under a checkpoint its witnesses cosigned, as <code>midgate agent statement</code> does.</p>",
    ]
    if not pages:
        parts.append("<p>This agent belongs to no MID yet (<code>midgate agent enrol</code>).</p>")
    for i, p in enumerate(pages):
        m = p.membership
        parts.append(f'<section aria-labelledby="mid-{i}"><h2 id="mid-{i}">{escape(m.mid)}</h2>')
        parts.append(f"<p>Device {escape(m.device)}, member {escape(m.record.member)}.</p>")
        parts.append("<h3>Your choices</h3>")
        parts.append(choices_section(p))
        parts.append("<h3>Statement</h3>")
        if p.statement is None:
            parts.append(f'<p class="error" role="alert">{escape(p.statement_problem)}</p>')
        else:
            parts.append(statement_section(p.statement))
            parts.append(f'<figure class="figure">{earnings_chart(p.statement, f"earnings-{i}")}</figure>')
        parts.append("<h3>Receipts</h3>")
        parts.append(receipts_section(p.receipts))
        parts.append("</section>")
    return page("Your midgate agent", "\n".join(parts))


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
