"""Schemathesis against the OpenAPI document `serve` serves (`/v1/openapi.json`), on the buyer job API: whatever it
generates from the document (bodies, paths, headers), the answer is never a 5xx, and every refusal is a 4xx with a
reason code and a message.

Requests are generated twice: as they come (unsigned, so the API must refuse them before reading anything), and signed
by a registered buyer on the way in. The signing is a client's work done in an ASGI wrapper in front of the real app:
it signs exactly the bytes schemathesis sends, so the app verifies real signatures and the generated bodies reach
the job desk."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from market_fixtures import Buyer, Market, market, now_ms

from protocol.buyer_request import SIGNATURE_HEADER, sign_request

__all__ = ["market"]

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


def _check(response: Any) -> None:
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        if isinstance(body, dict) and "reason" in body:
            assert body["message"], body
        else:  # the framework's own answer: a path or query it does not route
            assert "detail" in body, body


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_no_generated_request_gets_a_5xx(market: Market, tmp_path: Path, signed: bool) -> None:
    # A job of the buyer's own, so generated job ids are not all unknown ones.
    market.quoted_job(market.acme, tmp_path)
    app: Any = market.client.app
    schema = schemathesis.openapi.from_asgi("/v1/openapi.json", SigningClient(app, market.acme) if signed else app)
    operations = list(schema.include(path_regex="^/v1/jobs").get_all_operations())
    assert len(operations) == 10
    seen: dict[int, int] = {}
    for result in operations:
        operation = result.ok()
        if operation.path.endswith("/events"):
            continue  # a stream: answered below for an unknown job (a known one streams until the job ends)

        strategy = operation.as_strategy()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def check(case: Any) -> None:
            response = case.call()
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            _check(response)

        check()
    events = market.client.get("/v1/jobs/nope/events")
    _check(events)
    assert all(status < 500 for status in seen)
    if signed:
        assert any(200 <= status < 300 for status in seen), seen  # generated requests reached the desk
    else:
        # Without a buyer's key nothing gets through (schemathesis fills the signature header with garbage at most).
        assert 401 in seen and not any(200 <= status < 300 for status in seen), seen
