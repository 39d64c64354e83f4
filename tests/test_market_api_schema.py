"""Schemathesis against the OpenAPI document `serve` serves (`/v1/openapi.json`), on every route of it (enrolment, the
log, revenue, members' statements and knob, tasks, the buyer job API, metrics): whatever it generates from the
document (bodies, paths, headers), the answer is never a 5xx, and every refusal is a 4xx with a reason code and a
message. The app is built from serve's own builders (coordinator/serve/assembly.py) on fresh storage, without the
SuperLink (so buyer jobs are requested and quoted; accepting one is refused, as serve without federation does).

Requests are generated twice: as they come (unsigned, so the API must refuse them before reading anything), and signed
by a registered buyer on the way in. The signing is a client's work done in an ASGI wrapper in front of the real app:
it signs exactly the bytes schemathesis sends, so the app verifies real signatures and the generated bodies reach
the job desk."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from market_fixtures import TASK, Buyer, now_ms, validation_bytes
from prometheus_client import CollectorRegistry

from coordinator.config import CoordinatorSettings
from coordinator.http_refusals import http_status
from coordinator.serve.assembly import (
    build_enroller,
    build_job_desk,
    build_member_desks,
    build_policy_log,
    build_revenue_desk,
    close_job_desk,
    open_storage,
    policy_in_force_now,
    purposes_in_force_now,
)
from coordinator.serve.http import build_http_app
from protocol.buyer_request import SIGNATURE_HEADER, sign_request
from protocol.errors import Reason
from protocol.identity import SignerKey

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class SigningClient:
    """An ASGI wrapper that signs each request as the buyer's client would (protocol.buyer_request.sign_request)."""

    def __init__(self, app: Any, buyer: Buyer) -> None:
        self.app = app
        self.buyer = buyer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/jobs"):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        query = scope.get("query_string") or b""
        target = bytes(scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        target += ("?" + query.decode("latin-1")) if query else ""
        signed = sign_request(self.buyer.key, self.buyer.name, scope["method"], target, body, now_ms())
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != SIGNATURE_HEADER.lower().encode()]
        headers.append((SIGNATURE_HEADER.lower().encode(), signed[SIGNATURE_HEADER].encode()))
        replayed = False

        async def once() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, once, send)


@dataclass
class Served:
    client: TestClient
    acme: Buyer


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """The HTTP app as `serve` assembles it (coordinator/serve/assembly.py's builders), with buyer acme registered."""
    settings = CoordinatorSettings(mid="riverside", data_dir=tmp_path / "data")  # type: ignore[call-arg]
    storage = open_storage(settings)
    policies = build_policy_log(settings, storage)
    witnesses, statements = build_member_desks(settings, storage)
    market = build_job_desk(settings, storage, policies)
    acme = Buyer("acme", SignerKey.generate("acme"))
    market.store.add_buyer(acme.name, acme.key.verifier, now_ms())
    app = build_http_app(
        enroller=build_enroller(settings, storage, None),
        ledger=storage.ledger,
        revenue=build_revenue_desk(settings, storage, market.store),
        metrics=CollectorRegistry(),
        on_refusal=lambda reason: None,
        witnesses=witnesses,
        statements=statements,
        tasks=storage.tasks,
        market=market,
        knob_policy=(policy_in_force_now(policies), settings.royalties.currency),
        purposes=purposes_in_force_now(policies),
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Served(client, acme)
    finally:
        close_job_desk(market)
        storage.close()


def _signed(served: Served, method: str, target: str, body: bytes = b"") -> Any:
    headers = served.acme.headers(method, target, body)
    answer = served.client.request(method, target, content=body, headers=headers)
    assert answer.status_code < 300, answer.text
    return answer.json()


UNAVAILABLE = {Reason.QUORUM_NOT_MET}
"""The refusals whose documented status is a 5xx: the server's state, not the request (no witness yet)."""


def _check(response: Any) -> None:
    if response.status_code >= 400:
        body = response.json()
        if isinstance(body, dict) and "reason" in body:
            assert body["message"], body
            if response.status_code >= 500:
                assert Reason(body["reason"]) in UNAVAILABLE, body
                assert http_status(Reason(body["reason"])) == response.status_code, body
        else:  # the framework's own answer: a path or query it does not route
            assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
            assert "detail" in body, body


def _run(operation: Any, found: dict[int, int]) -> None:
    """Schemathesis's cases for one operation, each answer checked, its status counted into `found`."""

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())
    def check(case: Any) -> None:
        response = case.call()
        found[response.status_code] = found.get(response.status_code, 0) + 1
        _check(response)

    check()


BODIES = st.one_of(
    st.binary(max_size=4096),
    st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=40), st.integers(), st.none()), max_size=6).map(
        lambda doc: json.dumps(doc).encode()
    ),
)


def _run_raw_bodies(client: TestClient, path: str, found: dict[int, int]) -> None:
    """A POST route whose body is read raw (a DSSE envelope, an enrolment), so the document declares none and
    schemathesis sends none: arbitrary bytes and JSON objects to it."""

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=BODIES)
    def check(body: bytes) -> None:
        response = client.post(path, content=body)
        found[response.status_code] = found.get(response.status_code, 0) + 1
        _check(response)

    check()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_no_generated_request_gets_a_5xx(served: Served, tmp_path: Path, signed: bool) -> None:
    # A quoted job of the buyer's own, so generated job ids are not all unknown ones.
    job = _signed(served, "POST", "/v1/jobs", b'{"task": "%s", "purpose": "research"}' % TASK.encode())
    _signed(served, "POST", f"/v1/jobs/{job['job_id']}/validation", validation_bytes(tmp_path))
    app: Any = served.client.app
    schema = schemathesis.openapi.from_asgi("/v1/openapi.json", SigningClient(app, served.acme) if signed else app)
    operations = [result.ok() for result in schema.get_all_operations()]
    routes = {f"{o.method.upper()} {o.path}" for o in operations}
    assert len(routes) == len(operations) >= 22, sorted(routes)
    assert {"POST /v1/enrol", "POST /v1/member/statement", "GET /v1/jobs/{job_id}", "GET /metrics"} <= routes
    seen: dict[str, dict[int, int]] = {}
    for operation in operations:
        route = f"{operation.method.upper()} {operation.path}"
        if operation.path.endswith("/events"):
            continue  # a stream: answered below for an unknown job (a known one streams until the job ends)
        _run(operation, seen.setdefault(route, {}))
        if operation.method.upper() == "POST" and "requestBody" not in operation.definition.raw:
            _run_raw_bodies(served.client, operation.path, seen[route])
    _check(served.client.get("/v1/jobs/nope/events"))
    assert sum(seen["POST /v1/enrol"].values()) > 10, seen  # raw-body routes got bodies, not only schemathesis's none
    statuses = {status for found in seen.values() for status in found}
    assert all(status < 500 or status == 503 for status in statuses), seen
    jobs = {
        status
        for route, found in seen.items()
        if route.startswith(("GET /v1/jobs", "POST /v1/jobs"))
        for status in found
    }
    if signed:
        assert any(200 <= status < 300 for status in jobs), seen  # generated requests reached the job desk
    else:
        # Without a buyer's key nothing gets through (schemathesis fills the signature header with garbage at most).
        assert 401 in jobs and not any(200 <= status < 300 for status in jobs), seen
