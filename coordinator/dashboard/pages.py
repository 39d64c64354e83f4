"""The operator dashboard's pages, rendered on the server as plain HTML with inline SVG charts (no script at all):
devices and their last heartbeat, jobs and their rounds, attribution per job, payouts and royalties, the ledger and
its latest checkpoint with the witnesses' cosignatures, and the messages refused by reason.

Each page reads what `serve` already holds: the registry (devices, the presence ingest records from heartbeats),
the ledger through a `LedgerDigest` that follows it, the job book `job start` writes (with the round files of a
job still running), and the metrics registry's refusal counters.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from coordinator.capture.directory import capture_summary_path, read_round_summary, read_validation
from coordinator.dashboard.ledger_digest import LedgerDigest
from coordinator.dashboard.refusal_history import RefusalHistory, refusal_totals
from coordinator.dashboard.report import (
    MAX_GROWTH_POINTS,
    JobReport,
    accuracy_section,
    growth_section,
    ledger_growth,
    payouts_section,
    summary_section,
    thin,
    values_section,
)
from coordinator.federation.job_start import JobBook, JobRecord
from coordinator.ledger.store import LedgerReader
from coordinator.registry.store import Registry
from protocol.checkpoint import parse_checkpoint_text
from protocol.note import parse_note
from protocol.svg_charts import Series, bar_chart, data_table, escape, line_chart, page

TOP_EARNERS = 30
COSIGNED_LOOKBACK = 50
PAGES = (
    ("", "Overview"),
    ("devices", "Devices"),
    ("jobs", "Jobs"),
    ("payouts", "Payouts"),
    ("ledger", "Ledger"),
    ("rejections", "Refused messages"),
)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass
class BookCache:
    """The job book's records, each parsed again only when its file changes (a page lists every job)."""

    book: JobBook
    _cache: dict[str, tuple[int, JobRecord]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def records(self) -> list[JobRecord]:
        found = []
        with self._lock:
            for job_id in self.book.job_ids():
                try:
                    mtime = os.stat(self.book.path(job_id)).st_mtime_ns
                except FileNotFoundError:
                    continue
                cached = self._cache.get(job_id)
                if cached is None or cached[0] != mtime:
                    record = self.book.read(job_id)
                    if record is None:
                        continue
                    cached = (mtime, record)
                    self._cache[job_id] = cached
                found.append(cached[1])
        return found

    def record(self, job_id: str) -> JobRecord | None:
        return next((r for r in self.records() if r.request.job_id == job_id), None)


@dataclass(frozen=True)
class BuyerJobRow:
    """One buyer-market job as the jobs page lists it (coordinator/market/dashboard_rows.py reads them)."""

    job_id: str
    buyer: str
    state: str
    reason: str
    task: str
    total_minor: int | None
    """The quote's total (member pool and MID fee); None before a quote."""
    currency: str | None
    escrow_index: int | None
    """The ESCROW leaf that holds the buyer's payment; None before acceptance."""
    created_ms: int


@dataclass
class DashboardSources:
    """What the pages read; all shared with the rest of `serve` (each is safe to use from several threads).

    Parameters
    ----------
    mid: the MID's id.
    registry: devices and their presence.
    ledger: the MID's log (serve's writer, or a reader).
    book: the job book.
    jobs_dir: the jobs' round files.
    metrics: serve's metrics registry (the refusal counters).
    offline_after_s: `[ingest] heartbeat_offline_s`.
    """

    mid: str
    registry: Registry
    ledger: LedgerReader
    book: JobBook
    jobs_dir: Path
    metrics: CollectorRegistry
    offline_after_s: float
    digest: LedgerDigest = field(default_factory=LedgerDigest)
    books: BookCache | None = None
    history: RefusalHistory | None = None
    """serve's minute samples of the refusal counters (None: only the totals are shown)."""
    buyer_jobs: Callable[[], list[BuyerJobRow]] | None = None
    """The buyer market's jobs, newest first (None: no market; the jobs page then lists the job book only)."""

    def __post_init__(self) -> None:
        self.books = self.books or BookCache(self.book)

    def refreshed(self) -> LedgerDigest:
        return self.digest.refresh(self.ledger)


def nav(current: str, csrf: str) -> str:
    """The pages' links and the logout form, which carries the session's CSRF token `csrf`."""
    links = []
    for slug, title in PAGES:
        href = f"/operator/{slug}" if slug else "/operator"
        here = ' aria-current="page"' if slug == current else ""
        links.append(f'<a href="{href}"{here}>{escape(title)}</a>')
    links.append(
        '<form method="post" action="/operator/logout" style="display:inline">'
        f'<input type="hidden" name="csrf" value="{escape(csrf)}"><button type="submit">Log out</button></form>'
    )
    return " ".join(links)


def _page(sources: DashboardSources, current: str, title: str, body: str, csrf: str) -> str:
    heading = f"<h1>{escape(title)}</h1>\n{body}"
    return page(f"{title} - midgate {sources.mid} operator", heading, nav=nav(current, csrf))


def overview_page(sources: DashboardSources, now_ms: int, csrf: str) -> str:
    digest = sources.refreshed()
    devices = sources.registry.roster()
    presence = sources.registry.presence()
    offline_ms = int(sources.offline_after_s * 1000)
    online = sum(1 for d in devices if d.device_id in presence and presence[d.device_id].online(now_ms, offline_ms))
    records = sources.books.records() if sources.books else []
    running = sum(1 for r in records if r.status in ("inviting", "running"))
    refused = sum(refusal_totals(sources.metrics).values())
    rows = [
        ["devices enrolled", sum(1 for d in devices if not d.revoked)],
        ["devices online", online],
        ["jobs recorded", len(records)],
        ["jobs running", running],
        ["jobs settled", sum(1 for j in digest.jobs.values() if j.settlement is not None)],
        ["ledger leaves", digest.size],
        ["messages refused", int(refused)],
    ]
    return _page(sources, "", f"MID {sources.mid}", data_table("At a glance", ["what", "count"], rows), csrf)


def devices_page(sources: DashboardSources, now_ms: int, csrf: str) -> str:
    devices = sources.registry.roster()
    presence = sources.registry.presence()
    offline_ms = int(sources.offline_after_s * 1000)
    rows = []
    for d in sorted(devices, key=lambda d: d.device_id):
        seen = presence.get(d.device_id)
        if d.revoked:
            state = "revoked"
        elif seen is None:
            state = "never heard"
        else:
            state = "online" if seen.online(now_ms, offline_ms) else "offline"
        rows.append(
            [
                d.device_id,
                d.member_id,
                state,
                "-" if seen is None else seen.status,
                "-" if seen is None else _when(seen.last_seen_ms),
                _when(d.enrolled_ms),
            ]
        )
    online = sum(1 for r in rows if r[2] == "online")
    body = f"<p>{online} of {len(rows)} devices online (heard within {sources.offline_after_s:.0f} s).</p>\n"
    body += data_table(
        "Devices", ["device", "member", "state", "last status", "last heard", "enrolled"], rows, numeric_from=99
    )
    return _page(sources, "devices", "Devices", body, csrf)


def jobs_page(sources: DashboardSources, csrf: str) -> str:
    digest = sources.refreshed()
    rows = []
    for record in sorted(sources.books.records() if sources.books else [], key=lambda r: -r.started_ms):
        job_id = record.request.job_id
        logged = digest.jobs.get(job_id)
        final = record.outcome.final_validation if record.outcome else {}
        rows.append(
            [
                job_id,
                record.status,
                f"{record.request.task_id}@{record.request.task_version}",
                record.request.buyer,
                f"{record.rounds_completed or _rounds_seen(sources, record)} of {record.request.rounds}",
                len(record.selected_node_ids),
                "-" if "accuracy" not in final else f"{final['accuracy']:.4f}",
                "-" if logged is None else logged.index,
                "settled" if logged is not None and logged.settlement is not None else "-",
                _when(record.started_ms),
            ]
        )
    table = data_table(
        "Jobs (newest first)",
        ["job", "status", "task", "buyer", "rounds", "nodes", "final accuracy", "JOB leaf", "settlement", "started"],
        rows,
        numeric_from=99,
    )
    # Each job's id links to its page: the table escapes cell text, so the links are added to the first cells here.
    for row in rows:
        job_id = escape(row[0])
        table = table.replace(
            f'<th scope="row">{job_id}</th>', f'<th scope="row"><a href="/operator/jobs/{job_id}">{job_id}</a></th>', 1
        )
    if sources.buyer_jobs is not None:
        table += "\n" + buyer_jobs_table(sources.buyer_jobs())
    return _page(sources, "jobs", "Jobs", table, csrf)


def buyer_jobs_table(rows: list[BuyerJobRow]) -> str:
    """The buyer market's jobs (`/v1/jobs`): requested, quoted, paid into escrow, run, delivered or failed."""
    cells = [
        [
            r.job_id,
            r.state + (f": {r.reason}" if r.reason else ""),
            r.buyer,
            r.task,
            "-" if r.total_minor is None else f"{r.total_minor} {r.currency}",
            "-" if r.escrow_index is None else r.escrow_index,
            _when(r.created_ms),
        ]
        for r in rows
    ]
    return data_table(
        "Buyer jobs (newest first)",
        ["job", "state", "buyer", "task", "quote total (minor units)", "ESCROW leaf", "requested"],
        cells,
        numeric_from=99,
    )


def _rounds_seen(sources: DashboardSources, record: JobRecord) -> int:
    """Rounds a running job's ServerApp has validated so far (its round files)."""
    if record.run_id is None:
        return 0
    run_dir = sources.jobs_dir / f"run-{record.run_id}"
    count = 0
    while read_validation(run_dir, count + 1) is not None:
        count += 1
    return count


def live_rounds(sources: DashboardSources, record: JobRecord) -> str:
    """A job not logged yet (running, or `serve` not caught up): its rounds from the ServerApp's round files."""
    if record.run_id is None:
        return "<p>The job has not reached the SuperLink yet.</p>"
    run_dir = sources.jobs_dir / f"run-{record.run_id}"
    rows = []
    for server_round in range(1, record.request.rounds + 1):
        scored = read_validation(run_dir, server_round)
        summary = capture_summary_path(sources.jobs_dir, record.run_id, server_round)
        if scored is None or not summary.exists():
            break
        capture = read_round_summary(summary.read_bytes(), server_round)
        metrics, seconds = scored
        rows.append(
            [
                server_round,
                len(capture.updates),
                len(capture.drops),
                "-" if "accuracy" not in metrics else f"{metrics['accuracy']:.4f}",
                f"{metrics.get('loss', float('nan')):.4f}",
                "-" if seconds is None else f"{seconds:.1f}",
            ]
        )
    return data_table(
        f"Rounds so far (run {record.run_id})", ["round", "nodes", "dropped", "accuracy", "loss", "seconds"], rows
    )


def job_page(sources: DashboardSources, job_id: str, csrf: str) -> str | None:
    """None: no such job in the job book or the ledger."""
    digest = sources.refreshed()
    record = sources.books.record(job_id) if sources.books else None
    logged = digest.jobs.get(job_id)
    if record is None and logged is None:
        return None
    if logged is None:
        assert record is not None
        body = f"<p>Status: {escape(record.status)}. Not in the ledger yet: shown from the ServerApp's files.</p>"
        body += live_rounds(sources, record)
        return _page(sources, "jobs", f"Job {job_id}", body, csrf)
    growth = ledger_growth(sources.ledger)
    report = JobReport.of(sources.mid, logged, record, growth, digest.size)
    rounds = data_table(
        "Rounds (ROUND leaves)",
        ["round", "leaf", "updates", "dropped", "valuation", "skipped"],
        [[r.round, i, len(r.updates), len(r.drops), r.valuation or "-", r.skipped or "-"] for i, r in logged.rounds],
    )
    body = "\n".join(
        [
            summary_section(report),
            '<h2 id="s-rounds">Rounds</h2>',
            rounds,
            '<h2 id="s-accuracy">Accuracy per round</h2>',
            accuracy_section(report),
            '<h2 id="s-values">Attribution: value per member per round</h2>',
            values_section(report),
            '<h2 id="s-payouts">Payouts</h2>',
            payouts_section(report),
        ]
    )
    return _page(sources, "jobs", f"Job {job_id}", body, csrf)


def payouts_page(sources: DashboardSources, csrf: str) -> str:
    digest = sources.refreshed()
    per_member: dict[tuple[str, str], list[int]] = {}  # (member, currency) -> [settlements, royalties]
    rows = []
    for job_id, job in sorted(digest.jobs.items()):
        splits = ([("settlement", *job.settlement)] if job.settlement else []) + [
            ("royalty", i, r) for i, r in job.royalties
        ]
        for kind, index, split in splits:
            paid = sum(p.amount_minor for p in split.payouts)
            rows.append(
                [job_id, kind, index, split.inputs.currency, split.inputs.payment_minor, split.fee_minor, paid,
                 split.unallocated_minor]
            )  # fmt: skip
            for p in split.payouts:
                totals = per_member.setdefault((p.member, split.inputs.currency), [0, 0])
                totals[0 if kind == "settlement" else 1] += p.amount_minor
    splits_table = data_table(
        "Settlements and royalties (SETTLEMENT and ROYALTY leaves)",
        ["job", "kind", "leaf", "currency", "payment", "MID fee", "to members", "unallocated"],
        rows,
        numeric_from=2,
    )
    members = sorted(per_member)
    # A chart of a thousand bars says nothing: it shows the top earners, the table every member.
    top = sorted(members, key=lambda k: (-sum(per_member[k]), k))[:TOP_EARNERS]
    chart = bar_chart(
        "Earnings per member" + (f" (the {len(top)} highest of {len(members)})" if len(top) < len(members) else ""),
        [f"{m} ({c})" for m, c in top],
        [
            Series("settlements", values=tuple(float(per_member[k][0]) for k in top)),
            Series("royalties", values=tuple(float(per_member[k][1]) for k in top)),
        ],
        x_label="member",
        y_label="minor units",
        desc="The members' totals from settlements and from royalties, in minor units, highest first; the table"
        " lists every member.",
        chart_id="earnings",
    )
    member_table = data_table(
        "Earnings per member (minor units)",
        ["member", "currency", "settlements", "royalties", "total"],
        [[m, c, per_member[(m, c)][0], per_member[(m, c)][1], sum(per_member[(m, c)])] for m, c in members],
        numeric_from=2,
    )
    body = f'<figure class="figure">{chart}<figcaption>{member_table}</figcaption></figure>\n{splits_table}'
    return _page(sources, "payouts", "Payouts and royalties", body, csrf)


def _latest_cosigned(ledger: LedgerReader, sizes: list[int], origin: str) -> tuple[int, list[str]] | None:
    """(size, witness names) of the newest of the last COSIGNED_LOOKBACK checkpoints that carries cosignatures
    (witnesses cosign a checkpoint after it is issued, so the latest often has none yet)."""
    for size in sizes[:COSIGNED_LOOKBACK]:
        names = [s.name for s in parse_note(ledger.checkpoint(size)).signatures if s.name != origin]
        if names:
            return size, names
    return None


def ledger_page(sources: DashboardSources, csrf: str) -> str:
    digest = sources.refreshed()
    growth = ledger_growth(sources.ledger)
    rows: list[list[object]] = [["leaves", digest.size]]
    rows += [[f"{kind} leaves", count] for kind, count in sorted(digest.kinds.items())]
    body = data_table("Ledger", ["what", "count"], rows)
    if digest.size:
        note = parse_note(sources.ledger.checkpoint())
        checkpoint = parse_checkpoint_text(note.text)
        origin = checkpoint.origin
        cosigners = [s.name for s in note.signatures if s.name != origin]
        issued = growth[-1][0] if growth else None
        body += data_table(
            "Latest checkpoint",
            ["field", "value"],
            [
                ["origin", origin],
                ["size", checkpoint.size],
                ["root (base64)", note.text.split("\n")[2]],
                ["issued", _when(issued)],
                ["witness cosignatures", len(cosigners)],
            ],
            numeric_from=99,
        )
        witnessed = _latest_cosigned(sources.ledger, [size for _, size in reversed(growth)], origin)
        if witnessed is None:
            body += "<p>No witness has cosigned any of the latest checkpoints yet.</p>"
        else:
            size, names = witnessed
            body += data_table(
                f"Witnesses that cosigned the latest cosigned checkpoint (size {size})",
                ["witness"],
                [[name] for name in sorted(names)],
                numeric_from=99,
            )
    body += growth_section(thin(growth, MAX_GROWTH_POINTS), digest.size)
    return _page(sources, "ledger", "Ledger", body, csrf)


def rejections_page(sources: DashboardSources, csrf: str) -> str:
    counts = sorted(refusal_totals(sources.metrics).items(), key=lambda kv: (-kv[1], kv[0]))
    chart = bar_chart(
        "Refused messages by reason",
        [reason for reason, _ in counts],
        [Series("refused since serve started", values=tuple(v for _, v in counts))],
        x_label="reason code",
        y_label="messages",
        desc="How many device messages and HTTP requests were refused, by reason code (docs/protocol.md), since this"
        " coordinator started; the table lists the same.",
        chart_id="rejections",
    )
    table = data_table("Refused by reason", ["reason", "count"], [[r, int(v)] for r, v in counts])
    body = f'<figure class="figure">{chart}<figcaption>{table}</figcaption></figure>'
    body += over_time(sources.history.snapshot() if sources.history else [], [r for r, _ in counts][:8])
    body += f'<p class="muted">Counted since this process started ({_when(time.time_ns() // 1_000_000)} now).</p>'
    return _page(sources, "rejections", "Refused messages", body, csrf)


def over_time(samples: list[tuple[int, dict[str, float]]], reasons: list[str]) -> str:
    """The refusal totals of the most frequent `reasons` at each of serve's minute samples (the last day)."""
    if len(samples) < 2 or not reasons:
        return '<p class="muted">Refusals over time appear once serve has sampled its counters twice (each minute).</p>'
    first = samples[0][0]
    series = [
        Series(reason, tuple(((ms - first) / 60_000, totals.get(reason, 0.0)) for ms, totals in samples))
        for reason in reasons
    ]
    chart = line_chart(
        "Refusals over time",
        series,
        x_label=f"minutes since {_when(first)}",
        y_label="refused so far",
        desc="The running count of refusals for the most frequent reason codes, sampled once a minute; the table"
        " lists the first and the latest sample.",
        chart_id="rejections-over-time",
        y_floor=0.0,
    )
    rows = [[reason, int(samples[0][1].get(reason, 0)), int(samples[-1][1].get(reason, 0))] for reason in reasons]
    table = data_table(f"Refusals at {_when(first)} and at {_when(samples[-1][0])}", ["reason", "then", "latest"], rows)
    return f'<figure class="figure">{chart}<figcaption>{table}</figcaption></figure>'
