"""The buyer job API: `/v1/jobs...`, every request signed by a registered buyer (protocol/buyer_request.py).

Each route reads its body up to its limit first, then authenticates (the signature covers the body's hash), then acts;
so an unsigned request is refused `unsigned` whatever its body, and nothing is parsed for a stranger. Refusals have
the shape and statuses of every other endpoint (coordinator/http_refusals.py); docs/protocol.md, "Buyer jobs", is
the contract.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from coordinator.http_refusals import read_bounded_body, refusal
from coordinator.market.desk import MAX_JOB_REQUEST_BYTES, MAX_REQUEST_BYTES, JobDesk
from coordinator.market.models import TERMINAL, AcceptBody, JobList, JobRequestBody, MarketJob
from coordinator.market.store import MarketStore
from protocol.buyer_request import SIGNATURE_HEADER, SignedRequest, signature_key_ids, verify_request
from protocol.errors import ProtocolError, Reason, RevokedKeyError, UnknownKeyError

JOBS_PATH = "/v1/jobs"
EVENTS_POLL_S = 1.0
EVENTS_MAX_S = 24 * 3600.0
EVENTS_KEEPALIVE_S = 15.0
MANIFEST_TYPE = "application/vnd.dsse.envelope.v1+json"


def authenticate(store: MarketStore, method: str, target: str, header: str | None, body: bytes) -> SignedRequest:
    """The buyer who signed this request, its signature checked against the buyer's registered key and its nonce
    recorded; refused unsigned, unknown_key, revoked_key, bad_signature, stale_request or replayed. Blocking."""
    envelope, key_ids = signature_key_ids(header)
    buyer = next((b for b in map(store.buyer_by_key_id, key_ids) if b is not None), None)
    if buyer is None:
        raise UnknownKeyError("not signed by a registered buyer's key", key_ids=list(key_ids)[:4])
    if buyer.revoked:
        raise RevokedKeyError("the buyer's key is revoked", buyer=buyer.name, revoked_ms=buyer.revoked_ms)
    now = time.time_ns() // 1_000_000
    signed = verify_request(envelope, buyer.name, buyer.key, method, target, body, now)
    store.use_nonce(buyer.name, signed.statement.nonce, signed.statement.issued_ms, now)
    return signed


def _authenticated(
    store: MarketStore,
    method: str,
    target: str,
    header: str | None,
    body: bytes,
    action: Callable[[SignedRequest, bytes], Any],
) -> Any:
    """Authenticate, then act, in one worker thread: one hand-off per request, not two (bench/market_api_bench.py)."""
    return action(authenticate(store, method, target, header, body), body)


def request_target(request: Request) -> str:
    """The path and query exactly as the client sent them (what it signed)."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return bytes(raw).decode("latin-1") + (("?" + bytes(query).decode("latin-1")) if query else "")


def _json_body(model: type[Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


_OCTETS = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_SIGNATURE_DOC = {
    "parameters": [
        {
            "name": SIGNATURE_HEADER,
            "in": "header",
            "required": False,
            "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Midgate-Signature"},
            "description": "the request's signature (docs/protocol.md)",
        }
    ]
}
"""The signature header, as documentation only: a declared Header parameter costs FastAPI's parameter solving on every
request (~0.15 ms of ~1 ms on the route buyers poll, bench/market_api_bench.py); the routes read the header
themselves (signed_call)."""


def market_router(desk: JobDesk, on_refusal: Callable[[Reason], None] = lambda reason: None) -> APIRouter:
    router = APIRouter(tags=["buyer jobs"])

    async def signed_call(request: Request, limit: int, action: Callable[[SignedRequest, bytes], Any]) -> Any:
        body = await read_bounded_body(request, limit, "request body")
        header = request.headers.get(SIGNATURE_HEADER)
        target = request_target(request)
        return await asyncio.to_thread(_authenticated, desk.store, request.method, target, header, body, action)

    def answer(job: MarketJob, status: int = 200) -> Response:
        return Response(job.model_dump_json(), status_code=status, media_type="application/json")

    @router.post(
        JOBS_PATH,
        response_model=MarketJob,
        status_code=201,
        openapi_extra={**_json_body(JobRequestBody), **_SIGNATURE_DOC},
    )
    async def request_job(
        request: Request,
        idempotency_key: str | None = Header(default=None, alias="Idempotency-Key", max_length=128),
    ) -> Response:
        """Ask for a job; 201 with the new job, or 200 with the job an earlier request under the same
        Idempotency-Key created."""
        try:
            job, created = await signed_call(
                request, MAX_JOB_REQUEST_BYTES, lambda s, body: desk.request(s.buyer, body, idempotency_key)
            )
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return answer(job, 201 if created else 200)

    @router.get(JOBS_PATH, response_model=JobList, openapi_extra=_SIGNATURE_DOC)
    async def list_jobs(request: Request) -> Response:
        """The caller's own jobs."""
        try:
            jobs = await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.jobs(s.buyer))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return JSONResponse(JobList(jobs=jobs).model_dump(mode="json"))

    @router.get(JOBS_PATH + "/{job_id}", response_model=MarketJob, openapi_extra=_SIGNATURE_DOC)
    async def job_status(request: Request, job_id: str) -> Response:
        """The job: its state, quote, escrow, progress (round, members, accuracy so far) and ledger leaves."""
        try:
            return answer(await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.view(s.buyer, job_id)))
        except ProtocolError as error:
            return refusal(error, on_refusal)

    @router.post(
        JOBS_PATH + "/{job_id}/validation", response_model=MarketJob, openapi_extra={**_OCTETS, **_SIGNATURE_DOC}
    )
    async def upload_validation(request: Request, job_id: str) -> Response:
        """The buyer's validation windows for the job's task (a window file, protocol.tasks.windows)."""
        limit = desk.terms.max_validation_bytes
        try:
            job = await signed_call(request, limit, lambda s, body: desk.upload_validation(s.buyer, job_id, body))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return answer(job)

    @router.post(JOBS_PATH + "/{job_id}/quote", response_model=MarketJob, openapi_extra=_SIGNATURE_DOC)
    async def quote_job(request: Request, job_id: str) -> Response:
        """Price the job with the members eligible now."""
        try:
            return answer(await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.quote(s.buyer, job_id)))
        except ProtocolError as error:
            return refusal(error, on_refusal)

    @router.post(
        JOBS_PATH + "/{job_id}/accept",
        response_model=MarketJob,
        openapi_extra={**_json_body(AcceptBody), **_SIGNATURE_DOC},
    )
    async def accept_job(request: Request, job_id: str) -> Response:
        """Pay the quote into escrow (an ESCROW leaf) and start the job."""
        try:
            job = await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.accept(s.buyer, job_id, body, s))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return answer(job)

    @router.post(JOBS_PATH + "/{job_id}/cancel", response_model=MarketJob, openapi_extra=_SIGNATURE_DOC)
    async def cancel_job(request: Request, job_id: str) -> Response:
        """Drop a job not accepted yet, or stop an accepted one (it fails and its escrow is refunded)."""
        try:
            return answer(await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.cancel(s.buyer, job_id)))
        except ProtocolError as error:
            return refusal(error, on_refusal)

    @router.get(
        JOBS_PATH + "/{job_id}/model",
        response_class=Response,
        responses={200: {"content": {"application/octet-stream": {}}, "description": "final-model.npz"}},
        openapi_extra=_SIGNATURE_DOC,
    )
    async def download_model(request: Request, job_id: str) -> Response:
        """The delivered model (`final-model.npz`; its SHA-256 over the arrays is the job's `model_sha256`)."""
        try:
            path = await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.model_file(s.buyer, job_id))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return FileResponse(path, media_type="application/octet-stream", filename=f"{job_id}.npz")

    @router.get(
        JOBS_PATH + "/{job_id}/manifest",
        response_class=Response,
        responses={200: {"content": {MANIFEST_TYPE: {}}, "description": "the signed provenance manifest"}},
        openapi_extra=_SIGNATURE_DOC,
    )
    async def download_manifest(request: Request, job_id: str) -> Response:
        """The delivered job's provenance manifest, signed by the MID (`midgate buyer verify-model` checks it)."""
        try:
            found = await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.manifest(s.buyer, job_id))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return Response(found, media_type=MANIFEST_TYPE)

    @router.get(
        JOBS_PATH + "/{job_id}/events",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}, "description": "server-sent events"}},
        openapi_extra=_SIGNATURE_DOC,
    )
    async def job_events(request: Request, job_id: str) -> Response:
        """Server-sent events: one `event: job` with the job's JSON whenever it changes, until it ends."""
        try:
            first = await signed_call(request, MAX_REQUEST_BYTES, lambda s, body: desk.view(s.buyer, job_id))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return StreamingResponse(_events(desk, request, first), media_type="text/event-stream")

    return router


async def _events(desk: JobDesk, request: Request, job: MarketJob) -> AsyncIterator[bytes]:
    last, said = "", time.monotonic()
    deadline = said + EVENTS_MAX_S
    while True:
        text = job.model_dump_json()
        if text != last:
            yield b"event: job\ndata: " + text.encode() + b"\n\n"
            last, said = text, time.monotonic()
        elif time.monotonic() - said > EVENTS_KEEPALIVE_S:
            yield b": keepalive\n\n"  # a comment line: clients' read timeouts outlast a long round
            said = time.monotonic()
        if job.state in TERMINAL or time.monotonic() > deadline or await request.is_disconnected():
            return
        await asyncio.sleep(EVENTS_POLL_S)
        job = await asyncio.to_thread(desk.view, job.buyer, job.job_id)
