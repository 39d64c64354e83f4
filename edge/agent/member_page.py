"""The member page: what `agent run` shows the member in a browser (edge.agent.member_page_view lays it out), served
by the agent itself.

It listens on loopback by default (`member_page_host`); serving it to the home network, e.g. from a Pi hub, is the
member's explicit choice (`member_page_home_network`). On loopback it also answers only requests whose Host is a
loopback name (a web page elsewhere cannot reach it through DNS rebinding). GET only, no script, no login: it shows
and changes nothing the member's commands would not.

The server is asyncio's own, answering one request per connection: a page visited now and then needs no HTTP stack
resident in the idle agent. uvicorn here cost the idle agent about 4 MB (with click, httptools and websockets), and
the page's own code (statement, receipts, charts) 2 MB more, so it is imported at the first visit (BENCHMARKS.md,
"Raspberry Pi hub": idle agent target 50 MB RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path

from edge.agent.config import AgentSettings, is_loopback
from edge.agent.membership import Membership
from protocol.private_files import private_dir

log = logging.getLogger("midgate.agent.member_page")

HEADERS = (
    "content-type: text/html; charset=utf-8\r\n"
    "content-security-policy: default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'\r\n"
    "x-content-type-options: nosniff\r\n"
    "referrer-policy: no-referrer\r\n"
    "cache-control: no-store\r\n"
    "connection: close\r\n"
)
MAX_REQUEST_HEAD_BYTES = 16 * 1024
"""A request line and headers longer than this are refused (431) before they are parsed."""
REQUEST_HEAD_TIMEOUT_S = 10.0
"""A connection that has not sent its whole request head by then is closed: no slow client holds one open."""


class MemberPage:
    """Answers a request: `GET /` is the page; everything else 404, other methods 405, a foreign Host 421."""

    def __init__(self, settings: AgentSettings, memberships: list[Membership]) -> None:
        self.settings = settings
        self.memberships = memberships
        self.loopback_only = not settings.member_page_home_network

    async def answer(self, method: str, path: str, host: str) -> tuple[HTTPStatus, str]:
        from protocol.svg_charts import page

        if self.loopback_only and not is_loopback(host_name(host)):
            return HTTPStatus.MISDIRECTED_REQUEST, page("Wrong host", "<h1>This page answers only on localhost</h1>")
        if path.split("?", 1)[0] not in ("/", "/index.html"):
            return HTTPStatus.NOT_FOUND, page("Not found", "<h1>Not found</h1>")
        if method not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, page("Not allowed", "<h1>Only GET</h1>")
        from edge.agent.member_page_view import gather, render_member_page

        now_ms = time.time_ns() // 1_000_000
        pages = await asyncio.to_thread(gather, self.settings, self.memberships, now_ms)
        return HTTPStatus.OK, render_member_page(pages, now_ms)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request, one answer, then the connection is closed (HTTP/1.1 with `connection: close`)."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_HEAD_TIMEOUT_S)
            request = parse_request_head(head)
            if request is None:
                await _respond(writer, HTTPStatus.BAD_REQUEST, "")
                return
            status, body = await self.answer(*request)
            await _respond(writer, status, body, with_body=request[0] != "HEAD")
        except asyncio.LimitOverrunError:
            await _respond(writer, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away or never finished its request: nothing to answer
        except Exception:
            log.exception("member page failed")
            await _respond(writer, HTTPStatus.INTERNAL_SERVER_ERROR, "")
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def parse_request_head(head: bytes) -> tuple[str, str, str] | None:
    """(method, target, Host) of an HTTP/1.x request head, or None when it is not one."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    host = ""
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "host":
            host = value.strip()
    return parts[0], parts[1], host


def host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8490` -> `::1`, `localhost:8490` -> `localhost`."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.partition(":")[0]


async def _respond(writer: asyncio.StreamWriter, status: HTTPStatus, body: str, with_body: bool = True) -> None:
    data = body.encode()
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n{HEADERS}content-length: {len(data)}\r\n\r\n"
    writer.write(head.encode("latin-1") + (data if with_body else b""))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def url_file(settings: AgentSettings) -> Path:
    return settings.data_dir / "member-page.url"


@contextlib.asynccontextmanager
async def serving_member_page(settings: AgentSettings, memberships: list[Membership]) -> AsyncIterator[str | None]:
    """Serve the member page while inside (its URL, also written to data_dir/member-page.url); None when it is off
    or its address cannot be bound (logged: the agent runs on without it)."""
    if settings.member_page_port is None:
        yield None
        return
    host, port = settings.member_page_host, settings.member_page_port
    # Bound here, so that an address in use is said and the agent runs on without its page.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        log.error("member page not served: cannot listen on %s:%s: %s", host, port, exc,
                  extra={"host": host, "port": port})  # fmt: skip
        yield None
        return
    member_page = MemberPage(settings, memberships)
    server = await asyncio.start_server(member_page.serve_connection, sock=sock, limit=MAX_REQUEST_HEAD_BYTES)
    try:
        bound = sock.getsockname()[1]
        url = f"http://{f'[{host}]' if ':' in host else host}:{bound}/"
        private_dir(settings.data_dir)
        url_file(settings).write_text(url + "\n")
        log.info("member page at %s", url, extra={"url": url})
        yield url
    finally:
        server.close()
        await server.wait_closed()
        url_file(settings).unlink(missing_ok=True)
