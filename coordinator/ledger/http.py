"""The ledger's read endpoints: `GET /v1/checkpoint` (the latest signed checkpoint) and `GET /v1/consistency`
(a consistency proof between two tree sizes), which members' agents use to move their trusted checkpoint."""

from __future__ import annotations

import base64

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response

from coordinator.ledger.store import LedgerStore
from protocol.errors import ProtocolError

MAX_PROOF_QUERY = 1 << 62


def ledger_router(ledger: LedgerStore) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/checkpoint")
    def checkpoint() -> Response:
        return Response(ledger.checkpoint(), media_type="text/plain; charset=utf-8")

    @router.get("/v1/consistency")
    def consistency(old: int, new: int) -> Response:
        if not 0 <= old <= new <= MAX_PROOF_QUERY:
            return PlainTextResponse("need 0 <= old <= new", status_code=400)
        try:
            proof = ledger.consistency_proof(old, new)
        except ProtocolError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        return PlainTextResponse("".join(base64.b64encode(h).decode() + "\n" for h in proof))

    return router
