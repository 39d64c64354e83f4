"""The job report, the operator dashboard and the member page in a real Chromium (tests/browser.py).

Fast: the report of a job the real job-book follower logged and settled (tests/dashboard_data.py) opens from its
file with a clean console and shows its rounds and payouts. Slow: on real processes -- Mosquitto, `coordinator
serve` with its SuperLink, two `agent run`s replaying PLAID -- a 2-round job is run and settled through the real
commands; then the report `job report` writes, every operator page (after a refused
unauthenticated visit and a login with the password `operator passwd` set) and one member's page load without a
console error, show the job, its rounds and its payouts, and the member page's numbers are the ones that member's
`agent statement` prints. Screenshots go to the test's tmp_path/screenshots."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import chromium, visit
from dashboard_data import JOB, settled_mid
from mqtt_fixtures import PYTHON, REPO, MessagingStack, wait_until

from coordinator.dashboard.report import Baseline, build_job_report, render_job_report
from coordinator.ledger.store import LedgerStore
from protocol.identity import SignerKey

pytest_plugins = ["mqtt_fixtures"]


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[LedgerStore]:
    with LedgerStore.open(tmp_path / "ledger.sqlite", SignerKey.generate("midgate/test-mid")) as store:
        yield store


def test_the_report_file_opens_in_chromium_with_a_clean_console(tmp_path: Path, ledger: LedgerStore) -> None:
    mid = settled_mid(tmp_path, ledger)
    report = tmp_path / "report.html"
    report.write_text(render_job_report(build_job_report(ledger.path, mid.book, "m", JOB, Baseline("central", 0.9))))
    with chromium(tmp_path) as driver:
        text = visit(driver, report.as_uri(), tmp_path / "screenshots", "report")
        assert f"Job report: {JOB}" in text
        svgs = driver.find_elements("css selector", "svg[role=img]")
        assert len(svgs) == 4 and all(s.size["width"] > 300 for s in svgs)  # laid out, not collapsed
        for p in mid.settlement.payouts:
            assert f"{p.member} {p.price_minor} {p.weight} {p.amount_minor} {p.reason}" in text
    assert (tmp_path / "screenshots" / "report.png").stat().st_size > 10_000


# --- on real processes ----------------------------------------------------------------------------------------------

PASSWORD = "operator password for the browser test"
ROUNDS = 2
PAYMENT = 10_000


def _midgate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-c", "from midgate_cli import app; app()", *args],
        cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _status(url: str) -> tuple[int, str]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=30) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("location", "")


def _page_rows(text: str) -> list[tuple[str, int]]:
    """(for, amount) of each statement line as the member page's text shows it."""
    return [(what, int(amount)) for what, amount in re.findall(r"^\d{4}-\d\d-\d\d (.+?) (\d+) EUR ", text, re.M)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_after_a_real_job_the_report_dashboard_and_member_page_show_it(messaging_stack: MessagingStack) -> None:
    from fl_stack import finished_job, start_federated_coordinator, start_job, start_plaid_agents, stopping_federation

    stack = messaging_stack
    shots = stack.root / "screenshots"
    start_federated_coordinator(stack)
    agents = start_plaid_agents(stack, 2, extra="witness_every_s = 1.0")
    config = str(stack.config)
    base = f"http://127.0.0.1:{stack.http_port}"

    with stopping_federation(stack, agents) as teardown:
        finished_job(stack, start_job(stack, teardown, JOB, ROUNDS), JOB, timeout_s=420)
        settled = _midgate("coordinator", "job", "settle", JOB, "--payment", str(PAYMENT), "--currency", "EUR",
                           "--config", config)  # fmt: skip
        assert settled.returncode == 0, settled.stdout + settled.stderr
        set_password = _midgate("coordinator", "operator", "passwd", "--password-stdin", "--config", config,
                                stdin=PASSWORD + "\n")  # fmt: skip
        assert set_password.returncode == 0, set_password.stderr
        report = stack.root / "job-report.html"
        written = _midgate("coordinator", "job", "report", JOB, "--html", str(report), "--config", config)
        assert written.returncode == 0, written.stderr

        # Unauthenticated: every operator page answers with the way to the login form, never the page.
        for path in ("/operator", "/operator/jobs", f"/operator/jobs/{JOB}", "/operator/payouts"):
            assert _status(base + path) == (303, "/operator/login"), path

        member, record = agents[0]
        page_url = (member.data_dir / "member-page.url").read_text().strip()
        statement: list[str] = []

        def statement_verified() -> bool:
            done = _midgate("agent", "statement", "--config", str(member.config))
            statement[:] = [done.stdout]
            return done.returncode == 0

        wait_until(statement_verified, 60, "the member's statement verified (witnessed checkpoint)", 1.0)
        choices = [_midgate("agent", *command, "--config", str(member.config)) for command in
                   (("knob", "get"), ("consent", "show"))]  # fmt: skip
        assert all(c.returncode == 0 for c in choices), [c.stderr for c in choices]

        with chromium(stack.root) as driver:
            text = visit(driver, report.as_uri(), shots, "job-report")
            assert f"Job report: {JOB}" in text and "Accuracy per round" in text and "Payouts per member" in text

            login = visit(driver, base + "/operator/jobs", shots, "login")  # redirected to the login form
            assert driver.current_url == base + "/operator/login" and "Operator password" in login
            driver.find_element("id", "password").send_keys(PASSWORD)
            driver.find_element("css selector", "form[action='/operator/login'] button").click()
            visit(driver, None, shots, "after-login")
            assert driver.current_url == base + "/operator"

            overview = visit(driver, base + "/operator", shots, "overview")
            assert "jobs recorded 1" in overview and "jobs settled 1" in overview
            devices = visit(driver, base + "/operator/devices", shots, "devices")
            assert all(f"{handle.device} {handle.name} online" in devices for handle, _ in agents), devices
            jobs = visit(driver, base + "/operator/jobs", shots, "jobs")
            assert f"{JOB} completed" in jobs and f"{ROUNDS} of {ROUNDS}" in jobs and "settled" in jobs
            assert "Buyer jobs (newest first)" in jobs
            driver.find_element("link text", JOB).click()
            job = visit(driver, None, shots, "job")
            rounds = driver.find_elements("css selector", "table:first-of-type ~ table tbody tr")
            assert len(rounds) >= ROUNDS and "Rounds (ROUND leaves)" in job
            assert f"{PAYMENT} " in job and "Payouts per member" in job
            payouts = visit(driver, base + "/operator/payouts", shots, "payouts")
            assert f"{JOB} settlement" in payouts
            ledger = visit(driver, base + "/operator/ledger", shots, "ledger")
            assert "SETTLEMENT leaves 1" in ledger and "witness cosignatures" in ledger
            # The agents cosigned (the statement above verified under a witnessed checkpoint): the page names them.
            assert "Witnesses that cosigned the latest cosigned checkpoint" in ledger
            visit(driver, base + "/operator/rejections", shots, "rejections")
            # Logging out posts the page's CSRF token: the session ends, the pages lead to the login form again.
            driver.find_element("css selector", "form[action='/operator/logout'] button").click()
            visit(driver, None, shots, "logged-out")
            assert driver.current_url == base + "/operator/login"
            visit(driver, base + "/operator/jobs", shots, "after-logout")
            assert driver.current_url == base + "/operator/login"

            shown = visit(driver, page_url, shots, "member-page")
        printed = [(what, int(amount)) for what, amount in
                   re.findall(r"^  \d{4}-\d\d-\d\d  (.+?): (\d+) EUR minor units", statement[0], re.M)]  # fmt: skip
        assert printed and _page_rows(shown) == printed, (shown, statement[0])
        total = re.search(r"^Total: (\d+) EUR minor units", statement[0], re.M)
        assert total is not None and f"EUR {total.group(1)}" in shown
        assert record.member in shown
        # The knob and consent shown are the lines `agent knob get` and `agent consent show` print.
        assert all(c.stdout.strip() and c.stdout.strip() in shown for c in choices), (shown, choices)
    for name in ("job-report", "login", "overview", "jobs", "job", "payouts", "member-page"):
        assert (shots / f"{name}.png").stat().st_size > 5_000, name
