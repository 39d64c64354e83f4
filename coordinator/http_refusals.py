"""How the coordinator's HTTP endpoints read bodies and refuse: size checked while reading, one JSON refusal shape.

Every refusal is `{"reason": <reason code>, "message": ...}` with an HTTP status chosen by reason code, and is counted
through `on_refusal` like the MQTT ingest's rejections.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from protocol.errors import ProtocolError, Reason, TooLargeError

HTTP_STATUS = {
    Reason.INVITE_EXPIRED: 410,
    Reason.INVITE_USED: 409,
    Reason.INVITE_INVALID: 403,
    Reason.TOO_LARGE: 413,
    Reason.BAD_SIGNATURE: 403,
    Reason.UNKNOWN_KEY: 403,
    Reason.REPLAYED: 409,
    Reason.POLICY_VIOLATION: 422,
    Reason.UNKNOWN_MODEL: 404,
    Reason.REVOKED_KEY: 403,
    Reason.STALE_REQUEST: 403,
    Reason.INCONSISTENT: 409,
    Reason.QUORUM_NOT_MET: 503,
}
_MAX_MESSAGE = 1024


async def read_bounded_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with TooLargeError as soon as it exceeds `limit` (never buffered beyond it)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLargeError(f"{what} too large", limit=limit)
    return body


def refusal(error: ProtocolError, on_refusal: Callable[[Reason], None]) -> JSONResponse:
    on_refusal(error.reason)
    return JSONResponse(
        {"reason": str(error.reason), "message": error.message[:_MAX_MESSAGE]},
        status_code=HTTP_STATUS.get(error.reason, 400),
    )
