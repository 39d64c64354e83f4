"""Reconnect with backoff, written once for every long-lived broker connection: the agent's session
(edge/agent/session.py, over aiomqtt) and the coordinator's ingest clients (coordinator/ingest/mqtt.py).

Both sides need it, so it lives here; it does no I/O of its own: `connect` opens one connection (an async context
manager in aiomqtt's shape) and `serve` uses it until it is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import NoReturn, TypeVar

C = TypeVar("C")

JITTER = 0.25
"""Each delay is drawn from ±25 % around its nominal value, so that devices that lost the same broker at the same
moment do not all come back in the same second."""


def backoff_s(attempt: int, first_s: float, max_s: float) -> float:
    """The delay before retry number `attempt` (0 for the first): `first_s` doubled per attempt, capped at `max_s`,
    with jitter. Requires 0 < first_s."""
    nominal: float = min(max_s, first_s * 2 ** min(attempt, 32))
    return nominal * random.uniform(1 - JITTER, 1 + JITTER)


async def stay_connected(
    connect: Callable[[], AbstractAsyncContextManager[C]],
    serve: Callable[[C], Awaitable[object]],
    failures: tuple[type[Exception], ...],
    delays: tuple[float, float],
    log: logging.Logger,
    what: str,
) -> NoReturn:
    """Open a connection with `connect()`, run `serve` on it until it ends, and do it again, forever (cancel the task
    to stop). Between attempts wait `backoff_s(failed attempts, *delays)`; a connection that was made resets the
    count.

    Every failure (`failures`: a refused or unreachable broker, a lost connection) is logged at WARNING with its
    reason, once per change of reason: a broker that stays away for a day is one line, not thousands. `serve` returning
    counts as a lost connection.
    """
    attempt = 0
    last_reason: str | None = None
    while True:
        made = False
        try:
            async with connect() as connection:
                made = True
                if attempt:
                    log.info("%s: connected after %d failed attempts", what, attempt)
                attempt, last_reason = 0, None
                await serve(connection)
            reason = "connection closed"
        except failures as exc:
            reason = str(exc) or type(exc).__name__
        if reason != last_reason:
            state = "connection lost" if made else "cannot connect"
            log.warning("%s: %s (%s); retrying with backoff", what, state, reason, extra={"reason": reason})
            last_reason = reason
        await asyncio.sleep(backoff_s(attempt, *delays))
        attempt += 1


@contextlib.asynccontextmanager
async def staying_connected(
    connect: Callable[[], AbstractAsyncContextManager[C]],
    serve: Callable[[C], Awaitable[object]],
    failures: tuple[type[Exception], ...],
    delays: tuple[float, float],
    log: logging.Logger,
    what: str,
) -> AsyncIterator[None]:
    """`stay_connected` as a task owned by the `async with` block: started on entry, cancelled and awaited on exit."""
    task = asyncio.create_task(stay_connected(connect, serve, failures, delays, log, what))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


__all__ = ["JITTER", "backoff_s", "stay_connected", "staying_connected"]
