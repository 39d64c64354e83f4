"""`midgate coordinator job report JOB --html FILE` on a job the real job-book follower logged, settled and paid a
royalty on: one HTML file with no script, no external reference, every chart an SVG with a title, and every number
in its tables the one the ledger's leaves hold."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
from dashboard_data import JOB, PAYMENT, VALIDATION, settled_mid
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from coordinator.dashboard.report import Baseline, build_job_report, render_job_report, thin
from coordinator.federation.job_start import JobBook
from coordinator.ledger.store import LedgerStore
from protocol.identity import SignerKey


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerStore]:
    with LedgerStore.open(tmp_path / "ledger.sqlite", SignerKey.generate("midgate/test-mid")) as store:
        yield store


class _Tables(HTMLParser):
    """Every table's caption and rows of cell texts; every tag and attribute seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._caption: str | None = None
        self._in: str | None = None
        self._row: list[str] = []
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in ("caption", "td", "th"):
            self._in, self._text = tag, ""
        elif tag == "tr":
            self._row = []

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self._caption = self._text.strip()
            self.tables[self._caption] = []
        elif tag in ("td", "th") and self._in:
            self._row.append(self._text.strip())
        elif tag == "tr" and self._caption is not None:
            self.tables[self._caption].append(self._row)
        if tag in ("caption", "td", "th"):
            self._in = None


def _read(html: str) -> _Tables:
    parser = _Tables()
    parser.feed(html)
    return parser


def test_the_report_shows_the_job_s_rounds_values_and_payouts_as_the_ledger_holds_them(
    tmp_path: Path, ledger: LedgerStore
) -> None:
    mid = settled_mid(tmp_path, ledger)
    report = build_job_report(ledger.path, mid.book, "test-mid", JOB, Baseline("central training", 0.9))
    html = render_job_report(report)
    parsed = _read(html)

    accuracy = parsed.tables["Accuracy per round"]
    assert accuracy[1:] == [
        [str(r), f"{VALIDATION[r]['accuracy']:.4f}", f"{VALIDATION[r]['loss']:.4f}", "0.9000"] for r in (1, 2)
    ]
    # Values per member per round: ann's two devices summed (200 + 50, 100 + 50), cid screened and excluded.
    values = {row[0]: row[1:] for row in parsed.tables["Value per member per round (value units: nano loss drop)"][1:]}
    assert values["ann"] == ["250", "150", "400", "0", "-"]
    assert values["bob"] == ["250", "250", "500", "0", "-"]
    assert values["cid"] == ["0", "-", "0", "1", "zero_update"]
    payouts = {row[0]: row[1:] for row in parsed.tables["Payouts (EUR minor units)"][1:]}
    assert payouts == {
        p.member: [str(p.price_minor), str(p.weight), str(p.amount_minor), p.reason] for p in mid.settlement.payouts
    }
    [settlement_caption] = [c for c in parsed.tables if c.startswith("Settlement (SETTLEMENT leaf")]
    assert parsed.tables[settlement_caption][1] == [
        str(PAYMENT), str(mid.settlement.fee_minor), str(mid.settlement.pool_minor),
        str(mid.settlement.unallocated_minor),
    ]  # fmt: skip
    royalties = parsed.tables["Royalties on the job's model"][1:]
    assert [r[1:3] for r in royalties] == [["revenue-1", "3000"]]
    growth = parsed.tables["Ledger size at sampled checkpoints"][1:]
    assert growth[-1][1] == str(ledger.size)

    # Self-contained and accessible: no script, nothing fetched, every chart titled and described.
    assert not [t for t, _ in parsed.tags if t in ("script", "iframe", "img", "object", "embed")]
    assert [a for t, a in parsed.tags if t == "link"] == [{"rel": "icon", "href": "data:,"}]  # no favicon request
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert [a.get("lang") for t, a in parsed.tags if t == "html"] == ["en"]
    charts = re.findall(r"<svg .*?</svg>", html, re.DOTALL)
    assert len(charts) == 4
    for chart in charts:
        root = ET.fromstring(chart)
        assert root.get("role") == "img"
        assert root.find("{http://www.w3.org/2000/svg}title").text  # type: ignore[union-attr]
        assert root.find("{http://www.w3.org/2000/svg}desc").text  # type: ignore[union-attr]
    assert "central training (accuracy)" in charts[0]


def test_the_command_writes_the_file_and_refuses_a_job_the_ledger_does_not_hold(
    tmp_path: Path, ledger: LedgerStore
) -> None:
    settled_mid(tmp_path, ledger)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # The command reads the coordinator's own files: point its data folder at the ones the fixture wrote.
    (data_dir / "ledger.sqlite").symlink_to(ledger.path)
    (data_dir / "federation").mkdir()
    (data_dir / "federation" / "job-book").symlink_to(tmp_path / "job-book")
    config = tmp_path / "coordinator.toml"
    config.write_text(f'mid = "test-mid"\ndata_dir = "{data_dir}"\n')
    out = tmp_path / "report.html"
    runner = CliRunner()
    done = runner.invoke(
        coordinator_app, ["job", "report", JOB, "--html", str(out), "--baseline-accuracy", "0.9", "--config",
                          str(config)]
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert f"job report written to {out}" in done.output
    assert "Job report: job-7" in out.read_text()
    refused = runner.invoke(coordinator_app, ["job", "report", "job-8", "--html", str(out), "--config", str(config)])
    assert refused.exit_code == 1 and "no JOB leaf for job 'job-8'" in refused.output


def test_an_unsettled_job_says_so_and_thinning_keeps_both_ends() -> None:
    assert thin([(i, i) for i in range(1000)], 5) == [(0, 0), (250, 250), (500, 500), (749, 749), (999, 999)]
    assert thin([(1, 1)], 5) == [(1, 1)]


def test_a_job_without_payment_has_no_payout_chart(tmp_path: Path, ledger: LedgerStore) -> None:
    from test_job_ledger import POLICY, _ended

    from coordinator.federation.job_ledger import JobLedger

    book = JobBook(tmp_path / "job-book")
    book.write(_ended(tmp_path, JOB))
    JobLedger(book, tmp_path / "jobs", ledger, POLICY, "EUR").follow()
    html = render_job_report(build_job_report(ledger.path, book, "m", JOB))
    assert 'id="no-settlement"' in html and "Payouts per member" not in html
    assert "The job book holds no per-round validation" in html
