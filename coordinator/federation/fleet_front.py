"""The fleet front: what devices' SuperNodes reach of the MID's SuperLink.

Flower 1.42 serves its Fleet, Control and ServerAppIo APIs on one HTTP port. The front listens on the public
address with the SuperLink's TLS certificate, passes only `/v1/fleet/*` requests on to the SuperLink (which then
listens on loopback only), and answers everything else with 404, so the APIs that start and stop runs are not
reachable from the devices' network.

With Flower acceleration on (`[federation] flower_acceleration`, the default), the front also holds a SuperNode's
empty pull, and its pull of an object still being pushed, until there is something to answer
(coordinator.federation.acceleration.pull_hold); off, it passes every answer on as the SuperLink gave it.

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

from coordinator.federation.acceleration.pull_hold import HoldPolicy, PullHold
from coordinator.federation.superlink_process import SuperLinkProcess, stop_process_group, wait_for_port

log = logging.getLogger("midgate.federation.front")

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop headers (RFC 9110 section 7.6.1) and those the HTTP clients set themselves.
_NOT_FORWARDED = frozenset({b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te"})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class FleetFront:
    """The ASGI app: forwards Fleet requests to `upstream` (https://127.0.0.1:PORT); with a `hold`, its answers go
    back through it (Flower acceleration), without one as the SuperLink gave them."""

    upstream: str
    verify: ssl.SSLContext
    hold: PullHold | None = None
    max_body_bytes: int = 256 * 2**20
    stats_path: Path | None = None
    counts: Counter[str] = field(default_factory=Counter)
    _client: httpx.AsyncClient | None = None

    def stats(self) -> dict[str, int]:
        """The front's counters and its hold's."""
        return {**self.counts, **(self.hold.counts if self.hold is not None else {})}

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
                log.info("fleet front stopping: %s", self.stats())
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _write_stats_every(self, seconds: float) -> None:
        written: dict[str, int] = {}
        while True:
            await asyncio.sleep(seconds)
            if self.stats() != written:
                written = self.stats()
                self._write_stats()
                log.info("fleet front: %s", written)

    def _write_stats(self) -> None:
        """The counters as JSON, replaced atomically (what tests and operators read)."""
        if self.stats_path is None:
            return
        try:
            tmp = self.stats_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.stats(), sort_keys=True))
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
        client = self._client
        assert client is not None, "lifespan startup has not run"

        async def ask() -> httpx.Response:
            return await client.post(path, content=body, headers=headers)

        response = await ask()
        self.counts["forwarded"] += 1
        if self.hold is None or response.status_code != 200:
            return response
        return await self.hold.answer(path, body, response, ask)


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
    parser.add_argument(
        "--hold-s", type=float, default=HoldPolicy.hold_s, help="0: no holding, every answer passes on at once"
    )
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
        hold=PullHold(HoldPolicy(args.hold_s, args.poll_s, args.hot_s, args.idle_poll_s)) if args.hold_s > 0 else None,
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
    hold_s: float = HoldPolicy.hold_s  # 0: no holding (Flower acceleration off)
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
            "-P",  # never the working directory on sys.path: a data folder named like a package would shadow it
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
