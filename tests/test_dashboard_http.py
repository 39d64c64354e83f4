"""The operator dashboard under /operator, served by the coordinator's real HTTP app: every page refuses without a
session (a redirect to the login form), a wrong password is refused `bad_login` and counted, a flood of wrong
passwords is refused `rate_limited`, a login or logout POST without its form's CSRF token is refused `csrf` and changes
nothing, the session cookie is HttpOnly and SameSite=Strict, and once logged in each page shows what the registry, the
ledger and the metrics hold."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dashboard_data import JOB, settled_mid
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from coordinator.dashboard.auth import MAX_FAILURES, OperatorLogin, check_password, hash_password
from coordinator.dashboard.http import dashboard_router
from coordinator.dashboard.pages import DashboardSources
from coordinator.dashboard.refusal_history import RefusalHistory
from coordinator.federation.job_start import JobBook
from coordinator.ingest.metrics import IngestMetrics
from coordinator.ledger.store import LedgerStore
from coordinator.market.dashboard_rows import buyer_job_rows
from coordinator.market.models import Escrow, JobQuote, JobRequestBody, LedgerIndices, MarketJob
from coordinator.market.store import MarketStore
from coordinator.registry.presence import Presence
from coordinator.registry.store import Registry
from coordinator.serve.http import build_http_app
from protocol.errors import MalformedError, Reason
from protocol.identity import SignerKey
from protocol.messages import DeviceStatus

NOW_MS = 1_795_000_100_000
PASSWORD = "correct horse battery"
PAGES = ["/operator", "/operator/devices", "/operator/jobs", f"/operator/jobs/{JOB}", "/operator/payouts",
         "/operator/ledger", "/operator/rejections"]  # fmt: skip


class Dashboard:
    def __init__(self, client: TestClient, metrics: IngestMetrics, refused: list[Reason], ledger: LedgerStore) -> None:
        self.client, self.metrics, self.refused, self.ledger = client, metrics, refused, ledger

    def log_in(self, password: str = PASSWORD, token: str | None = None) -> Any:
        """POST the login form as a browser would: with the token of the form just served (unless `token`)."""
        form = self.client.get("/operator/login").text
        token = form_token(form) if token is None else token
        return self.post("/operator/login", f"csrf={token}&password={password.replace(' ', '+')}")

    def post(self, path: str, body: str) -> Any:
        return self.client.post(path, content=body, headers={"content-type": "application/x-www-form-urlencoded"},
                                follow_redirects=False)  # fmt: skip


def form_token(html: str) -> str:
    found = re.search(r'<input type="hidden" name="csrf" value="([A-Za-z0-9_-]+)">', html)
    assert found is not None, "no CSRF token in the form"
    return found.group(1)


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[Dashboard]:
    with LedgerStore.open(tmp_path / "ledger.sqlite", SignerKey.generate("midgate/test-mid")) as ledger:
        settled_mid(tmp_path, ledger)
        registry = Registry(tmp_path / "registry.sqlite")
        for i, device in enumerate(["d-a", "d-b", "d-c"]):
            registry.add_invite(f"inv{i}", "ann" if i < 2 else "bob", NOW_MS - 10_000, NOW_MS + 10_000)
            registry.redeem_invite(f"inv{i}", NOW_MS - 5_000, device, SignerKey.generate(device).verifier, "h")
        registry.record_presence([Presence("d-a", DeviceStatus("idle"), NOW_MS, 4_000_000_000_000, False)])
        metrics = IngestMetrics()
        refused: list[Reason] = []

        def on_refusal(reason: Reason) -> None:
            refused.append(reason)
            metrics.rejected.labels(reason=str(reason)).inc()

        metrics.rejected.labels(reason="bad_signature").inc(1)
        password_file = tmp_path / "operator-password"
        password_file.write_text(hash_password(PASSWORD, log2_n=10) + "\n")
        clock = iter(range(NOW_MS, NOW_MS + 10**9, 60_000))
        history = RefusalHistory(metrics.registry, clock_ms=lambda: next(clock))
        history.sample()  # a minute before the test's refusals
        sources = DashboardSources("test-mid", registry, ledger, JobBook(tmp_path / "job-book"), tmp_path / "jobs",
                                   metrics.registry, 180.0, history=history)  # fmt: skip
        market = MarketStore(tmp_path / "market.sqlite")
        buyer_jobs(market)
        sources.buyer_jobs = lambda: buyer_job_rows(market)
        router = dashboard_router(sources, OperatorLogin(password_file), on_refusal, secure_cookie=False)
        placeholder: Any = object()
        app = build_http_app(enroller=placeholder, ledger=ledger, revenue=placeholder, metrics=CollectorRegistry(),
                             on_refusal=on_refusal, dashboard=router)  # fmt: skip
        metrics.rejected.labels(reason="bad_signature").inc(2)
        history.sample()
        with TestClient(app) as client:
            yield Dashboard(client, metrics, refused, ledger)
        registry.close()
        market.close()


def buyer_jobs(market: MarketStore) -> None:
    """Two buyer jobs in a real market.sqlite: one just requested, one delivered (quoted, paid into escrow)."""
    request = JobRequestBody(task="har@1", purpose="research")
    asked = MarketJob(job_id="bj-1", buyer="acme", created_ms=NOW_MS - 9_000, updated_ms=NOW_MS - 9_000,
                      request=request)  # fmt: skip
    market.insert_job("bj-1", "acme", None, "0" * 64, asked.model_dump_json(), NOW_MS - 9_000)
    quote = JobQuote(job_id="bj-2", members=["ann", "bob"], devices=["d-a", "d-c"],
                     member_prices={"ann": 500, "bob": 700}, members_minor=1200, fee_minor=120, total_minor=1320,
                     currency="EUR", policy_version=1,
                     fee_bps=1000, issued_ms=NOW_MS, expires_ms=NOW_MS + 60_000)  # fmt: skip
    paid = MarketJob(job_id="bj-2", buyer="zeta", state="delivered", created_ms=NOW_MS - 5_000, updated_ms=NOW_MS,
                     request=request, quote=quote, escrow=Escrow(amount_minor=1320, currency="EUR",
                     quote_sha256=quote.sha256(), index=7), ledger=LedgerIndices(escrow=7, job=8))  # fmt: skip
    market.insert_job("bj-2", "zeta", None, "1" * 64, paid.model_dump_json(), NOW_MS - 5_000)
    market.update_job("bj-2", "delivered", paid.model_dump_json(), NOW_MS)


def test_every_page_refuses_without_a_session_and_shows_only_the_login_form(dashboard: Dashboard) -> None:
    for path in PAGES:
        answer = dashboard.client.get(path, follow_redirects=False)
        assert (answer.status_code, answer.headers["location"]) == (303, "/operator/login"), path
        assert JOB not in answer.text
    forged = dashboard.client.get("/operator/jobs", cookies={"midgate_operator": "forged"}, follow_redirects=False)
    assert forged.status_code == 303
    form = dashboard.client.get("/operator/login")
    assert form.status_code == 200 and '<label for="password">' in form.text
    assert "script-src" not in form.headers["content-security-policy"]
    assert "default-src 'none'" in form.headers["content-security-policy"]


def test_a_wrong_password_is_refused_and_counted_and_a_flood_is_rate_limited(dashboard: Dashboard) -> None:
    wrong = dashboard.log_in("not the password at all")
    assert wrong.status_code == 401 and 'role="alert"' in wrong.text and "set-cookie" not in wrong.headers
    assert dashboard.refused == [Reason.BAD_LOGIN]
    for _ in range(MAX_FAILURES - 1):
        dashboard.log_in("not the password at all")
    limited = dashboard.log_in()  # even the right password, until the window passes
    assert limited.status_code == 400 and dashboard.refused[-1] is Reason.RATE_LIMITED
    assert dashboard.refused.count(Reason.BAD_LOGIN) == MAX_FAILURES


def test_after_login_the_pages_show_devices_jobs_payouts_ledger_and_refusals(dashboard: Dashboard) -> None:
    answer = dashboard.log_in()
    assert answer.status_code == 303 and answer.headers["location"] == "/operator"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/operator" in cookie
    pages = {path: dashboard.client.get(path) for path in PAGES}
    assert all(p.status_code == 200 for p in pages.values()), {k: v.status_code for k, v in pages.items()}
    devices = pages["/operator/devices"].text
    assert '<th scope="row">d-a</th><td>ann</td><td>online</td><td>idle</td>' in devices
    assert '<th scope="row">d-c</th><td>bob</td><td>never heard</td>' in devices
    jobs = pages["/operator/jobs"].text
    assert f'<a href="/operator/jobs/{JOB}">{JOB}</a>' in jobs and "settled" in jobs
    market = jobs.split("<caption>Buyer jobs (newest first)</caption>", 1)[1]
    assert market.index('<th scope="row">bj-2</th>') < market.index('<th scope="row">bj-1</th>')
    assert '<th scope="row">bj-2</th><td>delivered</td><td>zeta</td><td>har@1</td><td>1320 EUR</td><td>7</td>' in market
    assert '<th scope="row">bj-1</th><td>requested</td><td>acme</td><td>har@1</td><td>-</td><td>-</td>' in market
    job = pages[f"/operator/jobs/{JOB}"].text
    assert "Value per member per round" in job and "Payouts per member" in job and "Rounds (ROUND leaves)" in job
    payouts = pages["/operator/payouts"].text
    assert "Earnings per member" in payouts
    assert f'<th scope="row">{JOB}</th><td>settlement</td>' in payouts
    assert f'<th scope="row">{JOB}</th><td>royalty</td>' in payouts
    ledger = pages["/operator/ledger"].text
    assert f'<th scope="row">size</th><td>{dashboard.ledger.size}</td>' in ledger
    assert '<th scope="row">SETTLEMENT leaves</th><td class="num">1</td>' in ledger
    rejections = pages["/operator/rejections"].text
    assert '<th scope="row">bad_signature</th><td class="num">3</td>' in rejections
    # Over time: serve's minute samples, the first (1 refusal) and the latest (3).
    assert "Refusals over time" in rejections
    assert '<th scope="row">bad_signature</th><td class="num">1</td><td class="num">3</td>' in rejections
    assert dashboard.client.get("/operator/jobs/nope").status_code == 404

    out = dashboard.post("/operator/logout", f"csrf={form_token(pages['/operator'].text)}")
    assert out.status_code == 303
    assert dashboard.client.get("/operator/jobs", follow_redirects=False).status_code == 303


def test_a_login_or_logout_without_its_form_s_token_is_refused_csrf_and_changes_nothing(dashboard: Dashboard) -> None:
    never_served = dashboard.post("/operator/login", f"csrf=&password={PASSWORD.replace(' ', '+')}")
    assert never_served.status_code == 403 and "set-cookie" in never_served.headers
    assert "midgate_operator" not in never_served.headers["set-cookie"]  # only a fresh login nonce
    wrong = dashboard.log_in(token="A" * 43)
    assert wrong.status_code == 403 and 'role="alert"' in wrong.text
    assert dashboard.refused == [Reason.CSRF, Reason.CSRF]
    assert dashboard.client.get("/operator/jobs", follow_redirects=False).status_code == 303  # not logged in

    answer = dashboard.log_in()
    assert answer.status_code == 303 and "midgate_login=" in answer.headers["set-cookie"]  # the nonce is dropped
    overview = dashboard.client.get("/operator").text
    token = form_token(overview)
    assert '<form method="post" action="/operator/logout"' in overview
    for body in ("", "csrf=", f"csrf={token[:-1]}x", f"csrf={'A' * 500}"):
        refused = dashboard.post("/operator/logout", body)
        assert refused.status_code == 403, body
    assert dashboard.refused == [Reason.CSRF] * 6
    assert dashboard.client.get("/operator/jobs", follow_redirects=False).status_code == 200  # still logged in
    assert dashboard.post("/operator/logout", f"csrf={token}").status_code == 303
    assert dashboard.client.get("/operator/jobs", follow_redirects=False).status_code == 303
    assert dashboard.metrics.rejected.labels(reason="csrf")._value.get() == 6


def test_the_password_hash_is_scrypt_salted_and_passwd_writes_it_0600(tmp_path: Path) -> None:
    first, second = hash_password(PASSWORD, log2_n=10), hash_password(PASSWORD, log2_n=10)
    assert first.startswith("scrypt$10$8$1$") and first != second
    assert check_password(first, PASSWORD) and not check_password(first, PASSWORD + "!")
    with pytest.raises(MalformedError):
        check_password("md5$abc", PASSWORD)
    with pytest.raises(MalformedError):
        hash_password("short")
    config = tmp_path / "coordinator.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    done = CliRunner().invoke(coordinator_app, ["operator", "passwd", "--password-stdin", "--config", str(config)],
                              input=PASSWORD + "\n")  # fmt: skip
    assert done.exit_code == 0, done.output
    path = tmp_path / "data" / "operator-password"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert check_password(path.read_text(), PASSWORD)
    assert PASSWORD not in path.read_text()
