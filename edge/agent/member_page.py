"""The member page: what `agent run` shows the member in a browser, for every MID it belongs to -- the statement,
the knob and the consent, the receipts it kept and whether they verify, and the earnings over time.

Every number comes from the same code as the member's commands: the statement is fetched and verified by
`fetch_membership_statement` and laid out by `statement_view`, exactly as `midgate agent statement` prints it; the
receipts are checked by `verify_membership_receipts` against the witnessed log, as `agent receipts --verify` does;
the knob and consent lines are the very lines `agent knob get` and `agent consent show` print
(edge.agent.controls.shown), read-only: the page shows them, the commands change them.
Nothing is cached: each visit asks the MID again, signed with the device key, and verifies on the device.

It listens on loopback by default (`member_page_host`); serving it to the home network, e.g. from a Pi hub, is the
member's explicit choice (`member_page_home_network`). On loopback it also answers only requests whose Host is a
loopback name (a web page elsewhere cannot reach it through DNS rebinding). GET only, no script, no login: it shows
and changes nothing the member's commands would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn

from edge.agent.config import AgentSettings, is_loopback
from edge.agent.controls.shown import consent_line, knob_line
from edge.agent.controls.state import MemberControlError
from edge.agent.ledger_client import ProofUnavailableError
from edge.agent.membership import Membership
from edge.agent.receipts import MembershipReceipts, ReceiptStatus, verify_membership_receipts
from edge.agent.statement import StatementView, fetch_membership_statement, statement_view
from protocol.errors import ProtocolError
from protocol.messages import MAX_TIME_MS, MIN_TIME_MS
from protocol.private_files import private_dir
from protocol.svg_charts import Series, data_table, escape, line_chart, page

log = logging.getLogger("midgate.agent.member_page")

HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


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


class MemberPageApp:
    """The ASGI app: `GET /` is the page; everything else 404, other methods 405."""

    def __init__(self, settings: AgentSettings, memberships: list[Membership]) -> None:
        self.settings = settings
        self.memberships = memberships
        self.loopback_only = not settings.member_page_home_network

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1").rsplit(":", 1)[0].strip("[]")
        if self.loopback_only and not is_loopback(host):
            await _answer(send, 421, page("Wrong host", "<h1>This page answers only on localhost</h1>"))
            return
        if scope["path"] not in ("/", "/index.html"):
            await _answer(send, 404, page("Not found", "<h1>Not found</h1>"))
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, page("Not allowed", "<h1>Only GET</h1>"))
            return
        now_ms = time.time_ns() // 1_000_000
        pages = await asyncio.to_thread(gather, self.settings, self.memberships, now_ms)
        await _answer(send, 200, render_member_page(pages, now_ms))


async def _answer(send: Send, status: int, body: str) -> None:
    data = body.encode()
    await send({"type": "http.response.start", "status": status, "headers": HEADERS})
    await send({"type": "http.response.body", "body": data})


def url_file(settings: AgentSettings) -> Path:
    return settings.data_dir / "member-page.url"


@contextlib.asynccontextmanager
async def serving_member_page(settings: AgentSettings, memberships: list[Membership]) -> AsyncIterator[str | None]:
    """Serve the member page while inside (its URL, also written to data_dir/member-page.url); None when it is off
    or its address cannot be bound (logged: the agent runs on without it)."""
    if settings.member_page_port is None:
        yield None
        return
    host, port = settings.member_page_host, settings.member_page_port
    # Bound here, not by uvicorn, which exits the process when it cannot bind.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.error("member page not served: cannot listen on %s:%s: %s", host, port, exc,
                  extra={"host": host, "port": port})  # fmt: skip
        yield None
        return
    config = uvicorn.Config(MemberPageApp(settings, memberships), log_level="warning", lifespan="off")
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        bound = sock.getsockname()[1]
        url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/"
        private_dir(settings.data_dir)
        url_file(settings).write_text(url + "\n")
        log.info("member page at %s", url, extra={"url": url})
        yield url
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        sock.close()
        url_file(settings).unlink(missing_ok=True)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the agent's run loop owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
