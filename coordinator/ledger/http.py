"""The ledger's HTTP endpoints (docs/protocol.md, "Member ledger API"): checkpoints and consistency proofs, which
members' agents use to move their trusted checkpoint, and the witness exchange (the witness list, the checkpoint to
cosign, cosignatures in, the latest witnessed checkpoint out).

None of it needs to be trusted: every answer is a signed note or a proof the agent checks. Checkpoints and proofs are
public (hashes and sizes only); no endpoint here serves a leaf.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from coordinator.http_refusals import read_bounded_body, refusal
from coordinator.ledger.store import LedgerStore
from coordinator.ledger.witnesses import MAX_COSIGNATURE_BODY, WitnessDesk
from protocol.errors import BadProofError, ProtocolError, QuorumNotMetError, Reason
from protocol.ledger_api import WitnessKey, WitnessList

MAX_PROOF_QUERY = 1 << 62
NOTE_TYPE = "text/plain; charset=utf-8"


def proof_lines(proof: list[bytes]) -> str:
    """A proof as the API serves it: one standard-base64 hash a line."""
    return "".join(base64.b64encode(h).decode() + "\n" for h in proof)


def ledger_router(
    ledger: LedgerStore,
    witnesses: WitnessDesk | None = None,
    on_refusal: Callable[[Reason], None] = lambda reason: None,
) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/checkpoint")
    def checkpoint(size: int | None = None) -> Response:
        try:
            if size is not None and not 0 <= size <= MAX_PROOF_QUERY:
                raise BadProofError("size out of range", size=size)
            return Response(ledger.checkpoint(size), media_type=NOTE_TYPE)
        except ProtocolError as exc:
            return refusal(exc, on_refusal)

    @router.get("/v1/consistency")
    def consistency(old: int, new: int) -> Response:
        try:
            if not 0 <= old <= new <= MAX_PROOF_QUERY:
                raise BadProofError("need 0 <= old <= new", old=old, new=new)
            return PlainTextResponse(proof_lines(ledger.consistency_proof(old, new)))
        except ProtocolError as exc:
            return refusal(exc, on_refusal)

    if witnesses is None:
        return router
    desk = witnesses

    @router.get("/v1/witnesses")
    def witness_list() -> Response:
        policy = desk.policy()
        if policy is None:
            return refusal(QuorumNotMetError("the MID has no witness yet"), on_refusal)
        keys = tuple(WitnessKey(device=w.name, key=w.text()) for w in policy.witnesses)
        body = WitnessList(quorum=policy.quorum, witnesses=keys).canonical_json()
        return Response(body, media_type="application/json")

    @router.get("/v1/checkpoint/witnessed")
    def witnessed() -> Response:
        try:
            return Response(desk.witnessed(), media_type=NOTE_TYPE)
        except ProtocolError as exc:
            return refusal(exc, on_refusal)

    @router.get("/v1/checkpoint/candidate")
    def candidate() -> Response:
        try:
            return Response(desk.candidate(), media_type=NOTE_TYPE)
        except ProtocolError as exc:
            return refusal(exc, on_refusal)

    @router.post("/v1/cosignature")
    async def cosignature(request: Request) -> Response:
        try:
            body = await read_bounded_body(request, MAX_COSIGNATURE_BODY, "cosigned checkpoint")
            accepted = await asyncio.to_thread(desk.accept, body)
        except ProtocolError as exc:
            return refusal(exc, on_refusal)
        return JSONResponse(
            {"size": accepted.size, "cosignatures": accepted.cosignatures, "witnessed": accepted.witnessed}
        )

    return router
