"""systemd's notify protocol for `agent run` under `Type=notify` (deploy/raspberrypi/midgate-agent.service).

READY=1 once every membership's runner is started, WATCHDOG=1 every half of `WATCHDOG_USEC` from the event loop
itself (so a loop blocked by a stuck fsync or a runaway callback stops the pings and systemd restarts the agent),
STOPPING=1 on the way out. The protocol is one datagram per message on the AF_UNIX socket named by `$NOTIFY_SOCKET`
(sd_notify(3)); a leading `@` names an abstract socket. Without `$NOTIFY_SOCKET` (a terminal, a test) nothing is sent.
A few lines here rather than a dependency: the agent is sized for a 512 MB board.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Mapping

log = logging.getLogger("midgate.agent.systemd")


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address `$NOTIFY_SOCKET` names (abstract ones with a leading NUL), or None when there is none.
    Requires: an absolute path or `@name`; anything else is ignored, as sd_notify(3) does."""
    path = environ.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]
    return path if path.startswith("/") else None


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises; None when
    no watchdog is set or it is meant for another process (`$WATCHDOG_PID`)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (owner and owner != str(pid)):
        return None
    return int(usec) / 2_000_000


def notify(address: str | None, message: str) -> None:
    """Send one notify message; a missing or vanished socket is logged once per call and otherwise ignored (the
    agent must keep serving even if systemd is restarted underneath it)."""
    if address is None:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as error:
            log.warning("systemd notify failed: %s", error)


@contextlib.asynccontextmanager
async def systemd_service(environ: Mapping[str, str] | None = None) -> AsyncIterator[None]:
    """Tell systemd the agent is ready on entry, ping its watchdog while inside, and that it stops on exit."""
    env = os.environ if environ is None else environ
    address = notify_address(env)
    interval = watchdog_interval_s(env, os.getpid())
    notify(address, f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")
    pinger = asyncio.create_task(_ping(address, interval)) if address and interval else None
    try:
        yield
    finally:
        if pinger is not None:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
        notify(address, "STOPPING=1")


async def _ping(address: str, interval_s: float) -> None:
    while True:
        notify(address, "WATCHDOG=1")
        await asyncio.sleep(interval_s)
