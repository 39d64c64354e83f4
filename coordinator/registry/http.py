"""The coordinator's small HTTP API: enrolment, ledger checkpoint and consistency proofs, Prometheus metrics, and the
buyer API's revenue reports (coordinator/buyer/http.py).

TLS is terminated in front of it (a reverse proxy) outside loopback demos. Handlers are plain `def`, so FastAPI runs
them in its worker threads and SQLite or signing never block the event loop. Bodies are size-checked before parsing.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from coordinator.buyer.http import RevenueDesk, revenue_router
from coordinator.http_refusals import read_bounded_body, refusal
from coordinator.ledger.store import LedgerStore
from coordinator.registry.enrolment import Enroller
from protocol.errors import ProtocolError, Reason

MAX_PROOF_QUERY = 1 << 62


def build_app(
    enroller: Enroller,
    ledger: LedgerStore,
    metrics: CollectorRegistry,
    on_refusal: Callable[[Reason], None] = lambda reason: None,
    revenue: RevenueDesk | None = None,
) -> FastAPI:
    app = FastAPI(title="midgate coordinator", docs_url=None, redoc_url=None, openapi_url=None)
    if revenue is not None:
        app.include_router(revenue_router(revenue, on_refusal))

    @app.get("/v1/info")
    def info() -> dict[str, str]:
        return {"mid": enroller.mid, "mid_key": enroller.mid_verifier.text()}

    @app.post("/v1/enrol")
    async def enrol(request: Request) -> Response:
        try:
            body = await read_bounded_body(request, enroller.max_body_bytes, "enrolment request")
            grant = await asyncio.to_thread(enroller.enrol, body, time.time_ns() // 1_000_000)
        except ProtocolError as exc:
            return refusal(exc, on_refusal)
        return Response(grant.model_dump_json(), media_type="application/json")

    @app.get("/v1/checkpoint")
    def checkpoint() -> Response:
        return Response(ledger.checkpoint(), media_type="text/plain; charset=utf-8")

    @app.get("/v1/consistency")
    def consistency(old: int, new: int) -> Response:
        if not 0 <= old <= new <= MAX_PROOF_QUERY:
            return PlainTextResponse("need 0 <= old <= new", status_code=400)
        try:
            proof = ledger.consistency_proof(old, new)
        except ProtocolError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        return PlainTextResponse("".join(base64.b64encode(h).decode() + "\n" for h in proof))

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app
