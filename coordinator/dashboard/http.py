"""The operator dashboard's routes under `/operator`, mounted beside the coordinator's API (coordinator/serve/http.py).

Every page needs a session (coordinator/dashboard/auth.py); without one a GET is redirected (303) to the login
form, which is the only page served without a session. A wrong password is refused 401 `bad_login`, too many in a
minute 400 `rate_limited`, a login or logout POST without its form's CSRF token (coordinator/dashboard/auth.py) 403
`csrf`; each is counted like every other refusal and changes nothing. Answers carry a Content-Security-Policy that
allows no script, no request elsewhere and no framing (the pages need none), and are never cached.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from coordinator.dashboard import pages
from coordinator.dashboard.auth import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    LOGIN_COOKIE_TTL_S,
    MAX_TOKEN_CHARS,
    SESSION_COOKIE,
    OperatorLogin,
)
from coordinator.dashboard.pages import DashboardSources
from coordinator.http_refusals import http_status, read_bounded_body
from protocol.errors import ProtocolError, Reason
from protocol.svg_charts import escape, page

MAX_LOGIN_BODY = 4096
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:;"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=HEADERS)


def login_form(token: str, message: str = "", configured: bool = True) -> str:
    error = f'<p class="error" role="alert" id="login-error">{escape(message)}</p>' if message else ""
    unset = (
        ""
        if configured
        else "<p>No operator password is set: run <code>midgate coordinator operator passwd</code> on the MID host.</p>"
    )
    return page(
        "Operator login - midgate",
        "<h1>Operator login</h1>\n" + unset + error + '<form method="post" action="/operator/login">'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(token)}">'
        '<label for="password">Operator password</label>'
        '<input id="password" name="password" type="password" autocomplete="current-password" required>'
        '<button type="submit">Log in</button></form>',
    )


def dashboard_router(
    sources: DashboardSources,
    login: OperatorLogin,
    on_refusal: Callable[[Reason], None],
    *,
    secure_cookie: bool = True,
) -> APIRouter:
    router = APIRouter()

    def signed_in(request: Request) -> bool:
        return login.valid(request.cookies.get(SESSION_COOKIE))

    def to_login() -> Response:
        return RedirectResponse("/operator/login", status_code=303, headers=HEADERS)

    def login_answer(request: Request, message: str = "", status: int = 200) -> HTMLResponse:
        """The login form with its CSRF token, bound to the nonce cookie the browser holds (a fresh one if none)."""
        nonce = request.cookies.get(LOGIN_COOKIE) or ""
        fresh = not 0 < len(nonce) <= MAX_TOKEN_CHARS
        if fresh:
            nonce = login.login_nonce()
        response = _html(login_form(login.form_token("login", nonce), message, login.configured), status)
        if not fresh:
            return response
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_COOKIE_TTL_S,
            path="/operator/login",
            secure=secure_cookie,
            httponly=True,
            samesite="strict",
        )
        return response

    async def form_fields(request: Request) -> dict[str, list[str]]:
        body = await read_bounded_body(request, MAX_LOGIN_BODY, "operator form")
        return parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=4)

    @router.get("/operator/login")
    def login_page(request: Request) -> HTMLResponse:
        return login_answer(request)

    @router.post("/operator/login")
    async def log_in(request: Request) -> Response:
        try:
            fields = await form_fields(request)
            token = (fields.get(CSRF_FIELD) or [""])[0]
            login.check_form_token("login", request.cookies.get(LOGIN_COOKIE), token)
            password = (fields.get("password") or [""])[0]
            session = await asyncio.to_thread(login.login, password)
        except (ProtocolError, ValueError) as error:
            reason = error.reason if isinstance(error, ProtocolError) else Reason.MALFORMED
            on_refusal(reason)
            messages = {
                Reason.BAD_LOGIN: "Wrong password.",
                Reason.RATE_LIMITED: "Too many attempts: wait a minute.",
                Reason.CSRF: "This form has expired or did not come from this dashboard: log in again.",
            }
            return login_answer(request, messages.get(reason, "The login form could not be read."), http_status(reason))
        response = RedirectResponse("/operator", status_code=303, headers=HEADERS)
        response.set_cookie(
            SESSION_COOKIE,
            session,
            max_age=int(login.session_ttl_s),
            path="/operator",
            secure=secure_cookie,
            httponly=True,
            samesite="strict",
        )
        response.delete_cookie(LOGIN_COOKIE, path="/operator/login", secure=secure_cookie, httponly=True,
                               samesite="strict")  # fmt: skip
        return response

    @router.post("/operator/logout")
    async def log_out(request: Request) -> Response:
        session = request.cookies.get(SESSION_COOKIE)
        if session:  # without one there is nothing to end
            try:
                fields = await form_fields(request)
                login.check_form_token("logout", session, (fields.get(CSRF_FIELD) or [""])[0])
            except (ProtocolError, ValueError) as error:
                reason = error.reason if isinstance(error, ProtocolError) else Reason.MALFORMED
                on_refusal(reason)
                body = '<h1>Not logged out</h1><p class="error" role="alert">The logout form did not come from this '
                body += 'dashboard. <a href="/operator">Back to the dashboard</a>.</p>'
                return _html(page("Not logged out", body), http_status(reason))
            login.logout(session)
        response = to_login()
        response.delete_cookie(SESSION_COOKIE, path="/operator", secure=secure_cookie, httponly=True, samesite="strict")
        return response

    def csrf(request: Request) -> str:
        return login.form_token("logout", request.cookies.get(SESSION_COOKIE) or "")

    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    @router.get("/operator")
    def overview(request: Request) -> Response:
        return _html(pages.overview_page(sources, now_ms(), csrf(request))) if signed_in(request) else to_login()

    @router.get("/operator/devices")
    def devices(request: Request) -> Response:
        return _html(pages.devices_page(sources, now_ms(), csrf(request))) if signed_in(request) else to_login()

    @router.get("/operator/jobs")
    def jobs(request: Request) -> Response:
        return _html(pages.jobs_page(sources, csrf(request))) if signed_in(request) else to_login()

    @router.get("/operator/jobs/{job_id}")
    def job(job_id: str, request: Request) -> Response:
        if not signed_in(request):
            return to_login()
        shown = pages.job_page(sources, job_id, csrf(request))
        if shown is None:
            return _html(
                page("No such job", f"<h1>No job {escape(job_id)}</h1>", nav=pages.nav("jobs", csrf(request))), 404
            )
        return _html(shown)

    @router.get("/operator/payouts")
    def payouts(request: Request) -> Response:
        return _html(pages.payouts_page(sources, csrf(request))) if signed_in(request) else to_login()

    @router.get("/operator/ledger")
    def ledger(request: Request) -> Response:
        return _html(pages.ledger_page(sources, csrf(request))) if signed_in(request) else to_login()

    @router.get("/operator/rejections")
    def rejections(request: Request) -> Response:
        return _html(pages.rejections_page(sources, csrf(request))) if signed_in(request) else to_login()

    return router
