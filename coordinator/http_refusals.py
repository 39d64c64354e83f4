"""How the coordinator's HTTP endpoints read bodies and refuse: size checked while reading, one JSON refusal shape.

Every refusal is `{"reason": <reason code>, "message": ...}` with an HTTP status chosen by reason code, is counted
through `on_refusal` like the MQTT ingest's rejections, and is logged as one WARNING line (docs/protocol.md,
"Reason codes" gives the status of every code and "Rejections are counted and logged" the line; tests hold both to
this module).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from protocol.errors import ProtocolError, Reason, TooLargeError

HTTP_STATUS: dict[Reason, int] = {
    Reason.INVITE_EXPIRED: 410,
    Reason.INVITE_USED: 409,
    Reason.INVITE_INVALID: 403,
    Reason.TOO_LARGE: 413,
    Reason.BAD_SIGNATURE: 403,
    Reason.UNKNOWN_KEY: 403,
    Reason.REPLAYED: 409,
    Reason.POLICY_VIOLATION: 422,
    Reason.UNKNOWN_MODEL: 404,
    Reason.UNKNOWN_TASK: 404,
    Reason.REVOKED_KEY: 403,
    Reason.STALE_REQUEST: 403,
    Reason.STRIKE: 409,
    Reason.INCONSISTENT: 409,
    Reason.QUORUM_NOT_MET: 503,
    Reason.BAD_LOGIN: 401,
    Reason.CSRF: 403,
    Reason.UNSIGNED: 401,
    Reason.UNKNOWN_JOB: 404,
    Reason.JOB_STATE: 409,
    Reason.IDEMPOTENCY_MISMATCH: 409,
}
"""The status of the reason codes an endpoint refuses with; every other code is 400 (`http_status`)."""

_MAX_MESSAGE = 1024
_MAX_LOGGED_ERROR = 300
log = logging.getLogger("midgate.http")


def http_status(reason: Reason) -> int:
    """The HTTP status a refusal with `reason` carries."""
    return HTTP_STATUS.get(reason, 400)


async def read_bounded_body(request: Request, limit: int, what: str) -> bytes:
    """The request body, refused with TooLargeError as soon as it exceeds `limit` (never buffered beyond it)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLargeError(f"{what} too large", limit=limit)
    return body


def refusal(error: ProtocolError, on_refusal: Callable[[Reason], None]) -> JSONResponse:
    """The answer to a refused request; counts it and logs it (its details name offending values, never secrets)."""
    status = http_status(error.reason)
    on_refusal(error.reason)
    log.warning(
        "request refused",
        extra={"reason": str(error.reason), "status": status, "error": str(error)[:_MAX_LOGGED_ERROR]},
    )
    return JSONResponse({"reason": str(error.reason), "message": error.message[:_MAX_MESSAGE]}, status_code=status)
