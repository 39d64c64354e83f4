"""protocol/reconnect.py: the one reconnect loop. Failures are logged once per change of reason, the backoff grows
from the first delay to the cap and starts again after a connection was made."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import pytest

from protocol import reconnect
from protocol.reconnect import JITTER, backoff_s, stay_connected


class Refused(Exception):
    pass


def test_backoff_doubles_from_the_first_delay_up_to_the_cap_with_jitter() -> None:
    for attempt, nominal in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (60, 10.0)]:
        delays = [backoff_s(attempt, 1.0, 10.0) for _ in range(200)]
        assert all(nominal * (1 - JITTER) <= d <= nominal * (1 + JITTER) for d in delays), attempt
        assert max(delays) - min(delays) > 0  # jittered, so devices do not all return in the same second


def test_each_failure_is_logged_once_per_change_and_a_connection_resets_the_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker: three refusals, one more of another kind, a connection that is lost, a refusal, then a stop.
    script = ["refused", "refused", "refused", "not authorised", "connect", "refused", "stop"]
    slept: list[float] = []
    served: list[str] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr(reconnect.asyncio, "sleep", sleep)
    monkeypatch.setattr(reconnect.random, "uniform", lambda lo, hi: 1.0)

    @contextlib.asynccontextmanager
    async def connect() -> AsyncIterator[str]:
        step = script.pop(0)
        if step == "stop":
            raise asyncio.CancelledError
        if step != "connect":
            raise Refused(step)
        yield "connection"

    async def serve(connection: str) -> None:
        served.append(connection)
        raise Refused("lost")

    async def scenario() -> None:
        with pytest.raises(asyncio.CancelledError):
            await stay_connected(connect, serve, (Refused,), (1.0, 4.0), logging.getLogger("t"), "broker b")

    with caplog.at_level(logging.INFO, logger="t"):
        asyncio.run(scenario())
    assert served == ["connection"]
    assert slept == [1.0, 2.0, 4.0, 4.0, 1.0, 2.0]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "broker b: cannot connect (refused); retrying with backoff",
        "broker b: cannot connect (not authorised); retrying with backoff",
        "broker b: connected after 4 failed attempts",
        "broker b: connection lost (lost); retrying with backoff",
        "broker b: cannot connect (refused); retrying with backoff",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "retrying" in r.getMessage())
