"""The enrolment endpoint: `GET /v1/info` (the MID and its key) and `POST /v1/enrol` (docs/protocol.md).

Handlers are plain `def` or hand blocking work to a thread, so SQLite and signing never block the event loop. The
body is size-checked while it is read, before anything parses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from coordinator.enrolment.enroller import Enroller
from coordinator.http_refusals import read_bounded_body, refusal
from protocol.errors import ProtocolError, Reason


def enrolment_router(enroller: Enroller, on_refusal: Callable[[Reason], None]) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/info")
    def info() -> dict[str, str]:
        return {"mid": enroller.mid, "mid_key": enroller.mid_verifier.text()}

    @router.post("/v1/enrol")
    async def enrol(request: Request) -> Response:
        try:
            body = await read_bounded_body(request, enroller.max_body_bytes, "enrolment request")
            grant = await asyncio.to_thread(enroller.enrol, body, time.time_ns() // 1_000_000)
        except ProtocolError as exc:
            return refusal(exc, on_refusal)
        return Response(grant.model_dump_json(), media_type="application/json")

    return router
