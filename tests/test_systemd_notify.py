"""`agent run` speaks systemd's notify protocol (edge.agent.systemd_notify): READY, watchdog pings, STOPPING."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from edge.agent.systemd_notify import notify_address, systemd_service, watchdog_interval_s


def test_notify_address_reads_paths_and_abstract_sockets() -> None:
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@sd-notify"}) == "\0sd-notify"
    assert notify_address({"NOTIFY_SOCKET": "relative"}) is None
    assert notify_address({}) is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "42"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "43"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env, 42) == expected


def test_service_says_ready_pings_the_watchdog_and_says_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(10)
        env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "20000"}

        async def serve() -> list[str]:
            got: list[str] = []
            async with systemd_service(env):
                while sum(m == "WATCHDOG=1" for m in got) < 2:
                    got.append((await asyncio.to_thread(listener.recv, 4096)).decode())
            # a ping may still be on its way when the service stops; STOPPING=1 is the last word
            while got[-1] != "STOPPING=1":
                got.append(listener.recv(4096).decode())
            return got

        messages = asyncio.run(serve())
    assert messages[0].startswith("READY=1\n")
    assert set(messages[1:-1]) == {"WATCHDOG=1"}


def test_without_a_notify_socket_nothing_is_sent_and_nothing_fails() -> None:
    async def serve() -> None:
        async with systemd_service({"WATCHDOG_USEC": "20000"}):
            await asyncio.sleep(0)

    asyncio.run(serve())
