"""The fleet front: what devices' SuperNodes reach of the MID's SuperLink.

Flower 1.42 serves its Fleet, Control and ServerAppIo APIs on one HTTP port. The front listens on the public
address with the SuperLink's TLS certificate, passes only `/v1/fleet/*` requests on to the SuperLink (which then
listens on loopback only), and answers everything else with 404, so the APIs that start and stop runs are not
reachable from the devices' network.

It also holds a SuperNode's empty pull. A SuperNode that pulls and finds no message sleeps a fixed 3 s before it
pulls again (`flwr/supernode/start_client_internal.py`); right after pushing a round's reply it always finds none,
because the next round's message waits for the other devices' replies. The front asks the SuperLink again, on the
SuperNode's behalf and at the rate `HoldPolicy` sets, for up to `hold_s`, and answers as soon as a message is there,
so the next round starts when it is ready rather than after the SuperNode's sleep. The repeated request is
the SuperNode's own, signed headers included (Flower's signature covers only a timestamp that stays valid for
minutes); a pull that stays empty is answered empty after `hold_s`, as the SuperLink would have answered it.
Flower's code is not changed: the SuperNode still sleeps whenever its pull comes back empty.

Run as `python -m coordinator.federation.fleet_front --listen HOST:PORT --upstream 127.0.0.1:PORT ...`;
`FleetFrontProcess` starts and stops it beside the SuperLink.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest
from flwr.proto.message_pb2 import PullObjectResponse
from google.protobuf.message import DecodeError

from coordinator.federation.superlink_process import SuperLinkProcess, stop_process_group, wait_for_port

log = logging.getLogger("midgate.federation.front")

FLEET_PREFIX = "/v1/fleet/"
PULL_MESSAGES = "/v1/fleet/pull-messages"
PUSH_MESSAGES = "/v1/fleet/push-messages"
PULL_OBJECT = "/v1/fleet/pull-object"
# Hop-by-hop headers (RFC 9110 section 7.6.1) and those the HTTP clients set themselves.
_NOT_FORWARDED = frozenset({b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class HoldPolicy:
    """How long an empty pull is held, and how often the SuperLink is asked again meanwhile.

    A round's next messages appear only after every device working on the round has pushed its reply. The front
    sees that: a node works from the pull that brought it a message to its push. For `hot_s` after the last
    working node pushed, the held pulls together ask the SuperLink every `poll_s` (each of n held pulls every
    n x `poll_s`, staggered); otherwise each asks every `idle_poll_s`, and all of them together at most
    `idle_rate` times a second. When one held pull is answered with a message, every other held pull asks at once
    (a round's messages are sent together). So the SuperLink sees a bounded rate of extra pulls, however many
    devices wait.
    """

    hold_s: float = 5.0
    poll_s: float = 0.02
    hot_s: float = 1.0
    idle_poll_s: float = 0.5
    idle_rate: float = 20.0
    work_s: float = 900.0
    object_poll_s: float = 0.025
    object_hold_s: float = 2.0


def object_not_yet_pushed(body: bytes) -> bool:
    """Whether a PullObject response says the object exists but its content has not arrived yet (the sender is
    still pushing it). Such an answer is a few bytes; one with content never is, and is not parsed."""
    if len(body) > 16:
        return False
    response = PullObjectResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return False
    return response.object_found and not response.object_available


def has_messages(body: bytes) -> bool:
    """Whether a PullMessages response body carries a message; an unreadable body counts as one (passed on as is)."""
    response = PullMessagesResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return True
    return len(response.messages_list) > 0


@dataclass
class FleetFront:
    """The ASGI app: forwards Fleet requests to `upstream` (https://127.0.0.1:PORT) and holds empty pulls."""

    upstream: str
    verify: ssl.SSLContext
    hold: HoldPolicy = field(default_factory=HoldPolicy)
    max_body_bytes: int = 256 * 2**20
    stats_path: Path | None = None
    counts: Counter[str] = field(default_factory=Counter)
    _client: httpx.AsyncClient | None = None
    _working: dict[int | None, float] = field(default_factory=dict)  # node id -> when its message was pulled
    _all_replied_at: float = 0.0
    _held: int = 0
    _news: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        writer: asyncio.Task[None] | None = None
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(
                    base_url=self.upstream,
                    verify=self.verify,
                    timeout=httpx.Timeout(60.0, connect=10.0),
                    limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
                )
                writer = asyncio.create_task(self._write_stats_every(5.0))
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if writer is not None:
                    writer.cancel()
                if self._client is not None:
                    await self._client.aclose()
                self._write_stats()
                log.info("fleet front stopping: %s", dict(self.counts))
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _write_stats_every(self, seconds: float) -> None:
        written: dict[str, int] = {}
        while True:
            await asyncio.sleep(seconds)
            if dict(self.counts) != written:
                written = dict(self.counts)
                self._write_stats()
                log.info("fleet front: %s", written)

    def _write_stats(self) -> None:
        """The counters as JSON, replaced atomically (what tests and operators read)."""
        if self.stats_path is None:
            return
        try:
            tmp = self.stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(dict(self.counts), sort_keys=True))
            tmp.replace(self.stats_path)
        except OSError as exc:
            log.warning("could not write %s: %s", self.stats_path, exc)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if scope["method"] != "POST" or not path.startswith(FLEET_PREFIX):
            self.counts["refused_not_fleet"] += 1
            log.warning("refused %s %s: not_fleet_api", scope["method"], path)
            await _reply(send, 404, b'{"error": "not_fleet_api"}', "application/json")
            return
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            self.counts["refused_too_large"] += 1
            log.warning("refused %s: body_too_large (limit %d bytes)", path, self.max_body_bytes)
            await _reply(send, 413, b'{"error": "body_too_large"}', "application/json")
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _NOT_FORWARDED]
        try:
            response = await self._forward(path, body, headers)
        except httpx.HTTPError as exc:
            self.counts["upstream_error"] += 1
            log.warning("upstream error on %s: %s", path, type(exc).__name__)
            await _reply(send, 502, b'{"error": "superlink_unreachable"}', "application/json")
            return
        content_type = response.headers.get("content-type", "application/octet-stream")
        await _reply(send, response.status_code, response.content, content_type)

    async def _forward(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> httpx.Response:
        assert self._client is not None, "lifespan startup has not run"
        response = await self._client.post(path, content=body, headers=headers)
        self.counts["forwarded"] += 1
        if response.status_code != 200:
            return response
        if path == PUSH_MESSAGES:
            self._replied(_node_id(PushMessagesRequest, body))
        if path == PULL_OBJECT and self.hold.object_hold_s > 0 and object_not_yet_pushed(response.content):
            return await self._hold_object_pull(path, body, headers, response)
        if path != PULL_MESSAGES:
            return response
        node_id = _node_id(PullMessagesRequest, body)
        if has_messages(response.content):
            self._working[node_id] = time.monotonic()
            return response
        if self.hold.hold_s <= 0:
            return response  # holding is off: the empty answer goes back at once, as the SuperLink gave it
        # An empty pull: ask again on the SuperNode's behalf until a message is there or the hold is over.
        self.counts["pulls_held"] += 1
        self._held += 1
        try:
            deadline = time.monotonic() + self.hold.hold_s
            while (remaining := deadline - time.monotonic()) > 0:
                await self._wait_for_news(min(remaining, self._poll_interval() * random.uniform(0.5, 1.5)))
                response = await self._client.post(path, content=body, headers=headers)
                self.counts["held_requests"] += 1
                if response.status_code != 200:
                    self.counts["held_pulls_refused"] += 1  # e.g. the run or the node ended: passed on as is
                    return response
                if has_messages(response.content):
                    self.counts["held_pulls_answered"] += 1
                    self._working[node_id] = time.monotonic()
                    self._news.set()  # the other held pulls ask now: their messages were sent with this one
                    self._news = asyncio.Event()
                    return response
            self.counts["held_pulls_empty"] += 1
            return response
        finally:
            self._held -= 1

    async def _hold_object_pull(
        self, path: str, body: bytes, headers: list[tuple[str, str]], response: httpx.Response
    ) -> httpx.Response:
        """A message's object asked for while the ServerApp is still pushing it: the SuperNode would back off 1 s
        (doubling) before asking again (flwr.supercore.inflatable.pull_objects); the front asks every
        `object_poll_s` for up to `object_hold_s` instead."""
        assert self._client is not None
        self.counts["object_pulls_held"] += 1
        deadline = time.monotonic() + self.hold.object_hold_s
        while time.monotonic() < deadline:
            await asyncio.sleep(self.hold.object_poll_s)
            response = await self._client.post(path, content=body, headers=headers)
            self.counts["held_requests"] += 1
            if response.status_code != 200 or not object_not_yet_pushed(response.content):
                return response
        self.counts["object_pulls_still_missing"] += 1
        return response

    def _replied(self, node_id: int | None) -> None:
        self._working.pop(node_id, None)
        if not self._still_working():
            self._all_replied_at = time.monotonic()

    def _still_working(self) -> bool:
        """Whether a node is working on a message; one that has not replied within `work_s` is taken for gone (it
        died, or its round was given up) and stops slowing the others' held pulls."""
        now = time.monotonic()
        for node_id, since in list(self._working.items()):
            if now - since > self.hold.work_s:
                del self._working[node_id]
        return bool(self._working)

    def _poll_interval(self) -> float:
        """One held pull's wait before it asks again; n held pulls ask n times as often as one, in sum."""
        held = max(1, self._held)
        if not self._still_working() and time.monotonic() - self._all_replied_at < self.hold.hot_s:
            return self.hold.poll_s * held
        return max(self.hold.idle_poll_s, held / self.hold.idle_rate)

    async def _wait_for_news(self, seconds: float) -> None:
        """Sleep `seconds`, or less if another held pull was just answered."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._news.wait(), seconds)


def _node_id(request_type: type[PullMessagesRequest] | type[PushMessagesRequest], body: bytes) -> int | None:
    request = request_type()
    try:
        request.ParseFromString(body)
    except DecodeError:
        return None
    return int(request.node.node_id)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it passes `limit` bytes (the rest is drained, not kept)."""
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        event = await receive()
        if event["type"] == "http.disconnect":
            return b""
        chunk: bytes = event.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        more = bool(event.get("more_body", False))
    return b"".join(chunks) if size <= limit else None


async def _reply(send: Send, status: int, body: bytes, content_type: str) -> None:
    headers = [(b"content-type", content_type.encode("latin-1")), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def upstream_ssl_context(ca_cert: Path) -> ssl.SSLContext:
    """Trust only the MID CA. The upstream is the SuperLink on loopback, whose certificate names the public hosts
    devices use, so its chain is checked and its name is not."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.check_hostname = False
    return context


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m coordinator.federation.fleet_front", description=__doc__)
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT devices' SuperNodes connect to")
    parser.add_argument("--upstream", type=_host_port, required=True, help="the SuperLink's HOST:PORT (loopback)")
    parser.add_argument("--ca-cert", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True, help="the SuperLink's server certificate")
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--hold-s", type=float, default=HoldPolicy.hold_s, help="0 passes empty pulls on at once")
    parser.add_argument("--poll-s", type=float, default=HoldPolicy.poll_s)
    parser.add_argument("--hot-s", type=float, default=HoldPolicy.hot_s)
    parser.add_argument("--idle-poll-s", type=float, default=HoldPolicy.idle_poll_s)
    parser.add_argument("--max-body-mb", type=float, default=256.0)
    parser.add_argument("--stats-file", type=Path, help="the counters as JSON, every 5 s and at exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per forwarded request otherwise

    import uvicorn  # the SuperLink's own HTTP server (a Flower dependency)

    host, port = args.upstream
    front = FleetFront(
        upstream=f"https://{host}:{port}",
        verify=upstream_ssl_context(args.ca_cert),
        hold=HoldPolicy(args.hold_s, args.poll_s, args.hot_s, args.idle_poll_s),
        max_body_bytes=int(args.max_body_mb * 2**20),
        stats_path=args.stats_file,
    )
    listen_host, listen_port = args.listen
    log.info("fleet front on %s:%d -> %s:%d, hold %.1f s", listen_host, listen_port, host, port, args.hold_s)
    uvicorn.run(
        front,
        host=listen_host,
        port=listen_port,
        ssl_certfile=str(args.cert),
        ssl_keyfile=str(args.key),
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )


@dataclass
class FleetFrontProcess:
    """One fleet front process in its own process group, beside a SuperLink listening on `upstream`."""

    listen_host: str
    listen_port: int
    upstream: str
    ca_cert: Path
    cert: Path
    key: Path
    log_path: Path
    hold_s: float = HoldPolicy.hold_s
    stats_path: Path | None = None
    max_body_mb: float = 256.0
    proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def beside(
        cls, link: SuperLinkProcess, listen_host: str, listen_port: int, log_path: Path, **options: Any
    ) -> FleetFrontProcess:
        """A front for `link`, serving its certificate and trusting its CA; `options` are the other fields."""
        return cls(
            listen_host=listen_host,
            listen_port=listen_port,
            upstream=link.address,
            ca_cert=link.tls.ca_cert,
            cert=link.tls.server_cert,
            key=link.tls.server_key,
            log_path=log_path,
            **options,
        )

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "coordinator.federation.fleet_front",
            "--listen",
            self.address,
            "--upstream",
            self.upstream,
            "--ca-cert",
            str(self.ca_cert),
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
            "--hold-s",
            str(self.hold_s),
            "--max-body-mb",
            str(self.max_body_mb),
            *(["--stats-file", str(self.stats_path)] if self.stats_path is not None else []),
        ]

    def stats(self) -> dict[str, int]:
        """The front's counters as last written (every 5 s while it runs, and when it stops)."""
        if self.stats_path is None or not self.stats_path.exists():
            return {}
        return {str(k): int(v) for k, v in json.loads(self.stats_path.read_text()).items()}

    def start(self, timeout: float = 30.0) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        wait_for_port(self.listen_host, self.listen_port, time.monotonic() + timeout, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=5.0)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
