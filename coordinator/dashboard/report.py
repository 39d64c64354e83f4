"""`midgate coordinator job report JOB --html FILE`: one self-contained HTML file about one job, for its buyer and the
MID's members: the global model's accuracy per round (beside a central baseline when one is given), each member's
value per round (the attribution the settlement split by), the payouts (settlement and royalties) and how the
ledger grew.

Every number is read from the ledger's leaves (the JOB, ROUND, SETTLEMENT and ROYALTY records: what anyone can audit)
except the per-round validation metrics, which only the job book holds (the ServerApp's outcome, written by `job
start`). The file holds no script, no stylesheet or font from elsewhere: charts are inline SVG rendered here
(protocol.svg_charts), each followed by a table of the same numbers as its text alternative.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from coordinator.dashboard.ledger_digest import LedgerDigest, LoggedJob
from coordinator.federation.job_start import JobBook, JobRecord
from coordinator.ledger.store import LedgerReader
from protocol.svg_charts import Series, bar_chart, data_table, escape, line_chart, page

VALUE_SCALE = 1_000_000_000
"""A value unit is a nano-unit of validation-loss drop (protocol/job_log.py); charts show loss drop."""
MAX_GROWTH_POINTS = 400


@dataclass(frozen=True)
class Baseline:
    """A reference accuracy the federated model is compared with, e.g. central training on the pooled windows."""

    label: str
    accuracy: float


@dataclass
class JobReport:
    """What the report shows about one job; `growth` is (issued_ms, size) of the log's checkpoints."""

    mid: str
    job: LoggedJob
    validation: dict[int, dict[str, float]] = field(default_factory=dict)
    baseline: Baseline | None = None
    growth: list[tuple[int, int]] = field(default_factory=list)
    ledger_size: int = 0
    generated_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    @classmethod
    def of(
        cls,
        mid: str,
        job: LoggedJob,
        book_record: JobRecord | None,
        growth: list[tuple[int, int]],
        ledger_size: int,
        baseline: Baseline | None = None,
    ) -> JobReport:
        validation = {}
        if book_record is not None and book_record.outcome is not None:
            validation = {int(r): dict(m) for r, m in book_record.outcome.validation.items()}
        return cls(mid, job, validation, baseline, thin(growth, MAX_GROWTH_POINTS), ledger_size)

    @property
    def metric(self) -> str:
        """The score charted per round: accuracy for a classification task, else the task's own (e.g. mae)."""
        names = {name for metrics in self.validation.values() for name in metrics if name != "loss"}
        return "accuracy" if "accuracy" in names or not names else sorted(names)[0]

    def members(self) -> list[str]:
        """Every member the job's ROUND leaves or attribution name, sorted."""
        found = {u.member for _, r in self.job.rounds for u in r.updates}
        return sorted(found | {m.member for m in self.job.record.attribution})

    def member_round_values(self) -> dict[str, list[int | None]]:
        """member -> value units per round (its devices' updates summed; None: not valued in that round)."""
        values: dict[str, list[int | None]] = {m: [None] * len(self.job.rounds) for m in self.members()}
        for i, (_, rnd) in enumerate(self.job.rounds):
            for update in rnd.updates:
                if update.value_units is None:
                    continue
                before = values[update.member][i]
                values[update.member][i] = (before or 0) + update.value_units
        return values


def ledger_growth(ledger: LedgerReader) -> list[tuple[int, int]]:
    """(issued_ms, size) of every checkpoint the log issued, oldest first."""
    return [(issued_ms, size) for size, issued_ms in ledger.checkpoint_history()]


def thin(points: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """At most `most` of `points`, evenly spaced, always keeping the first and the last. Requires most >= 2."""
    if len(points) <= most:
        return list(points)
    step = (len(points) - 1) / (most - 1)
    return [points[round(i * step)] for i in range(most)]


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def summary_section(report: JobReport) -> str:
    job = report.job.record
    rows = [
        ("MID", report.mid),
        ("status", f"{job.status}" + (f" ({job.reason})" if job.reason else "")),
        ("task", f"{job.task_id}@{job.task_version}"),
        ("buyer / purpose", f"{job.buyer} / {job.purpose}"),
        ("rounds", f"{job.rounds_completed} of {job.rounds}"),
        ("devices selected", str(sum(1 for d in job.devices if d.selected))),
        ("model version", job.model_version or "-"),
        ("started", _when(job.started_ms)),
        ("ended", _when(job.ended_ms)),
        ("JOB leaf", str(report.job.index)),
    ]
    rows += [(f"final {name}", f"{value:.4f}") for name, value in sorted(job.final_validation.items())]
    return data_table(f"Job {job.job_id}", ["field", "value"], rows, numeric_from=99)


def accuracy_section(report: JobReport) -> str:
    metric = report.metric
    rounds = sorted(report.validation)
    federated = tuple((float(r), report.validation[r][metric]) for r in rounds if metric in report.validation[r])
    series = [Series(f"federated global model ({metric})", federated)]
    if report.baseline is not None and rounds:
        level = report.baseline.accuracy
        ends = ((float(rounds[0]), level), (float(rounds[-1]), level))
        series.append(Series(f"{report.baseline.label} (accuracy)", ends))
    bounded = metric == "accuracy"
    chart = line_chart(
        f"{metric.capitalize()} per round",
        series,
        x_label="round",
        y_label=metric,
        desc=f"The global model's {metric} on the buyer's validation set after each round"
        + (f", beside {report.baseline.label} at {report.baseline.accuracy:.4f}" if report.baseline else "")
        + ". The table below lists the same numbers.",
        chart_id="accuracy",
        y_floor=0.0 if bounded else None,
        y_ceiling=1.0 if bounded else None,
    )
    header = ["round", metric, "loss"] + ([report.baseline.label] if report.baseline else [])
    rows = []
    for r in rounds:
        m = report.validation[r]
        row: list[object] = [r, _fmt(m.get(metric)), _fmt(m.get("loss"))]
        if report.baseline:
            row.append(f"{report.baseline.accuracy:.4f}")
        rows.append(row)
    note = "" if rounds else '<p class="muted">The job book holds no per-round validation for this job.</p>'
    return _figure(chart, data_table(f"{metric.capitalize()} per round", header, rows)) + note


def values_section(report: JobReport) -> str:
    values = report.member_round_values()
    categories = [str(rnd.round) for _, rnd in report.job.rounds]
    series = [
        Series(member, values=tuple(float("nan") if v is None else v / VALUE_SCALE for v in per_round))
        for member, per_round in values.items()
    ]
    chart = bar_chart(
        "Value per member per round",
        categories,
        series,
        x_label="round",
        y_label="validation-loss drop",
        desc="Each member's attributed value in each round (the drop in validation loss its updates bought, from the"
        " ROUND leaves); negative values pay nothing. The table below lists the same numbers in value units.",
        chart_id="values",
    )
    screens: dict[str, set[str]] = {}
    excluded: dict[str, int] = {}
    for _, rnd in report.job.rounds:
        for u in rnd.updates:
            screens.setdefault(u.member, set()).update(u.screens)
            excluded[u.member] = excluded.get(u.member, 0) + int(u.excluded)
    header = ["member", *[f"round {c}" for c in categories], "job total", "excluded rounds", "screens"]
    totals = {m.member: m.value_units for m in report.job.record.attribution}
    rows = [
        [
            member,
            *["-" if v is None else v for v in per_round],
            totals.get(member, "-"),
            excluded.get(member, 0),
            ", ".join(sorted(screens.get(member, ()))) or "-",
        ]
        for member, per_round in values.items()
    ]
    return _figure(chart, data_table("Value per member per round (value units: nano loss drop)", header, rows))


def payouts_section(report: JobReport) -> str:
    settled = report.job.settlement
    if settled is None:
        return '<p id="no-settlement">This job is not settled yet: no SETTLEMENT leaf names it.</p>'
    index, split = settled
    currency = split.inputs.currency
    members = [p.member for p in split.payouts]
    chart = bar_chart(
        "Payouts per member",
        members,
        [Series(f"settlement ({currency} minor units)", values=tuple(float(p.amount_minor) for p in split.payouts))],
        x_label="member",
        y_label=f"{currency} minor units",
        desc=f"What each member was paid from the buyer's payment of {split.inputs.payment_minor} {currency} minor"
        " units (the SETTLEMENT leaf). The table below lists the same numbers.",
        chart_id="payouts",
    )
    totals = data_table(
        f"Settlement (SETTLEMENT leaf {index}, record {split.inputs.record_id})",
        ["payment", "MID fee", "members' pool", "unallocated"],
        [[split.inputs.payment_minor, split.fee_minor, split.pool_minor, split.unallocated_minor]],
        numeric_from=0,
    )
    payouts = data_table(
        f"Payouts ({currency} minor units)",
        ["member", "price", "weight", "amount", "reason"],
        [[p.member, p.price_minor, p.weight, p.amount_minor, p.reason] for p in split.payouts],
    )
    royalties = data_table(
        "Royalties on the job's model",
        ["leaf", "record", "revenue", "MID fee", "to members", "unallocated"],
        [
            [
                i,
                r.inputs.record_id,
                r.inputs.payment_minor,
                r.fee_minor,
                sum(p.amount_minor for p in r.payouts),
                r.unallocated_minor,
            ]
            for i, r in report.job.royalties
        ],
    )
    return _figure(chart, totals + payouts) + royalties


def growth_section(growth: list[tuple[int, int]], ledger_size: int) -> str:
    """The log's size at each checkpoint ((issued_ms, size), oldest first) and now."""
    first_ms = growth[0][0] if growth else 0
    points = tuple(((ms - first_ms) / 60_000, float(size)) for ms, size in growth)
    chart = line_chart(
        "Ledger growth",
        [Series("leaves in the log", points)],
        x_label=f"minutes since the first checkpoint ({_when(first_ms) if growth else '-'})",
        y_label="leaves",
        desc=f"The log's size at each signed checkpoint; it holds {ledger_size} leaves now. The table below"
        " lists a sample of the same points.",
        chart_id="growth",
        y_floor=0.0,
    )
    sample = thin(growth, 12)
    table = data_table(
        "Ledger size at sampled checkpoints", ["issued", "leaves"], [[_when(ms), size] for ms, size in sample]
    )
    return _figure(chart, table)


def render_job_report(report: JobReport) -> str:
    """The whole HTML document."""
    job = report.job.record
    body = "\n".join(
        [
            f"<h1>Job report: {escape(job.job_id)}</h1>",
            f'<p class="muted">Generated {escape(_when(report.generated_ms))} from the ledger of MID'
            f" {escape(report.mid)} (size {report.ledger_size}). Every number below is read from the ledger's JOB,"
            " ROUND, SETTLEMENT and ROYALTY leaves, except the per-round validation metrics (the job book).</p>",
            '<section aria-labelledby="s-summary"><h2 id="s-summary">Summary</h2>',
            summary_section(report),
            "</section>",
            '<section aria-labelledby="s-accuracy"><h2 id="s-accuracy">Accuracy per round</h2>',
            accuracy_section(report),
            "</section>",
            '<section aria-labelledby="s-values"><h2 id="s-values">Value per member per round</h2>',
            values_section(report),
            "</section>",
            '<section aria-labelledby="s-payouts"><h2 id="s-payouts">Payouts</h2>',
            payouts_section(report),
            "</section>",
            '<section aria-labelledby="s-growth"><h2 id="s-growth">Ledger growth</h2>',
            growth_section(report.growth, report.ledger_size),
            "</section>",
        ]
    )
    return page(f"Job report {job.job_id} - midgate {report.mid}", body)


def _figure(chart: str, table: str) -> str:
    return f'<figure class="figure">\n{chart}\n<figcaption>\n{table}\n</figcaption>\n</figure>'


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class JobNotLoggedError(Exception):
    """The ledger holds no JOB leaf for the job (not ended yet, or `serve` has not logged it)."""


def build_job_report(
    ledger_path: Path, book: JobBook, mid: str, job_id: str, baseline: Baseline | None = None
) -> JobReport:
    """The report of `job_id`, read from the ledger file (read-only, beside a running `serve`) and the job book."""
    with LedgerReader.open_existing(ledger_path) as reader:
        digest = LedgerDigest().refresh(reader)
        growth = ledger_growth(reader)
        size = reader.size
    job = digest.jobs.get(job_id)
    if job is None:
        raise JobNotLoggedError(f"no JOB leaf for job {job_id!r} in the ledger ({size} leaves)")
    return JobReport.of(mid, job, book.read(job_id), growth, size, baseline)
