"""`midgate coordinator ingest-worker`: one screening worker of an MQTT 5 shared subscription.

The broker hands each device message to one worker of the group. The worker runs the same screening as `serve`
(`pipeline.Screener`: size -> topic -> rate -> verify -> signer owns topic -> schema, heartbeat order), acknowledges
rejections and heartbeats at once, and hands the verified rest to the sequencer in authenticated batches
(coordinator/ingest/handoff.py). It acknowledges those originals only when the sequencer's commit notice for their
batch arrives, i.e. after the ledger commit. A worker killed at any point loses nothing: its unacknowledged messages
stay in its persistent session (redelivered when it returns) and devices resend whatever they hold no receipt for;
the sequencer's dedup answers everything that was committed already.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from coordinator.broker.logins import coordinator_password, worker_password_path, worker_username
from coordinator.config import CoordinatorSettings
from coordinator.ingest.handoff import (
    HANDOFF_TARGET_BYTES,
    VerifiedBatch,
    committed_topic,
    load_or_create_handoff_key,
    open_committed,
    seal_verified,
    worker_filters,
)
from coordinator.ingest.metrics import WorkerMetrics
from coordinator.ingest.mqtt import BrokerEndpoint, ManualAckClient
from coordinator.ingest.pipeline import (
    InboundMessage,
    Outcome,
    Screener,
    Verdict,
    freeze_startup_objects,
    log_rejection,
    screen_one,
)
from coordinator.registry.store import Registry
from protocol.errors import ProtocolError
from protocol.messages import DeviceStatus
from protocol.topics import check_id

log = logging.getLogger("midgate.ingest.worker")
REGISTRY_POLL_S = 1.0
STATS_EVERY_S = 5.0
# Heartbeat summaries ride on the next hand-off, or go alone when no report came for this long.
SEEN_EVERY_S = 1.0
# A stopping worker waits at most this long (or handoff_timeout_s, if shorter) for the commit notices of batches it
# already handed off: under the 10 s a container runtime gives before SIGKILL, and a notice normally takes
# milliseconds, so only a sequencer that is down makes the drain last this long.
DRAIN_MAX_S = 8.0


@dataclass
class _Pending:
    tokens: list[object]
    sent: float


@dataclass
class WorkerCounts:
    received: int = 0
    forwarded: int = 0
    committed: int = 0
    heartbeats: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    redeliveries: int = 0
    dropped_at_shutdown: int = 0
    """Device messages that arrived after the stop and were released unacknowledged (the broker redelivers them)."""


class ScreeningWorker:
    """`async with ScreeningWorker(settings, "1") as worker: await worker.run()`; `stop()` ends `run()`."""

    def __init__(
        self, settings: CoordinatorSettings, worker_id: str, metrics_port: int | None = None, metrics_host: str = ""
    ) -> None:
        self.settings = settings
        self.worker_id = check_id(worker_id, "worker")
        self.counts = WorkerCounts()
        self.metrics = WorkerMetrics()
        self._metrics_at = (metrics_host or "127.0.0.1", metrics_port)
        self._metrics_server: object | None = None
        self._seen: dict[str, int] = {}
        self._statuses: dict[str, DeviceStatus] = {}
        self._seen_sent = time.monotonic()
        self._stop = asyncio.Event()
        self._arrived = asyncio.Event()
        """Set by either connection when messages arrive."""
        self._exits = contextlib.AsyncExitStack()
        self._pending: dict[int, _Pending] = {}
        self._next_batch = time.time_ns()  # unique across restarts, so a stale notice never matches a new batch
        self._notice_topic = committed_topic(settings.mid, self.worker_id)

    async def __aenter__(self) -> ScreeningWorker:
        s = self.settings
        self.key = load_or_create_handoff_key(s.handoff_key_path)
        self.registry = Registry(s.registry_path)
        self.screener = Screener(
            s.mid, self.registry, s.ingest.max_message_bytes, s.ingest.rate_per_s, s.ingest.rate_burst
        )
        await asyncio.to_thread(self.screener.refresh_registry)
        # Its own login (coordinator/broker/logins.py), not the coordinator's: the broker ACL then lets it write only
        # its own hand-off topic and read only its own commit notices.
        endpoint = BrokerEndpoint(
            host=s.broker.host,
            port=s.broker.port,
            username=worker_username(self.worker_id),
            password=coordinator_password(worker_password_path(s, self.worker_id)),
            client_id=f"{s.broker.client_id}-worker-{self.worker_id}",
            ca_file=str(s.broker.ca_file) if s.broker.tls and s.broker.ca_file else None,
            keepalive_s=s.broker.keepalive_s,
            mqtt5=True,  # shared subscriptions are MQTT 5
        )
        # Hand-offs go out and commit notices come in on a second connection. On the first, the device messages
        # awaiting their commit fill both the broker's in-flight window (a notice queued behind them never arrives)
        # and our own bound (a notice behind them is never read): measured here as a deadlock.
        handoff = dataclasses.replace(endpoint, client_id=f"{endpoint.client_id}-handoff")
        self.handoff_session = ManualAckClient(handoff, 1000, 1000, arrived=self._arrived)
        await self._exits.enter_async_context(self.handoff_session)
        await self.handoff_session.subscribe(self._notice_topic)
        self.session = ManualAckClient(endpoint, s.ingest.queue_max, s.ingest.receive_maximum, arrived=self._arrived)
        await self._exits.enter_async_context(self.session)
        await self.session.subscribe(*worker_filters(s.mid, s.ingest.share_group))
        host, port = self._metrics_at
        if port is not None:
            from prometheus_client import start_http_server

            server, _ = start_http_server(port, host, registry=self.metrics.registry)
            self._metrics_server = server
            log.info("metrics endpoint", extra={"host": host, "port": server.server_address[1]})
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._exits.aclose()
            self.registry.close()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()  # type: ignore[attr-defined]
        finally:
            # Even when stopping failed: the counts say what this worker leaves unacknowledged in its session.
            self._log_counts("worker stopped")

    def stop(self) -> None:
        self._stop.set()
        self._arrived.set()  # start the drain now, not at the end of the current 1 s registry-poll wait

    async def run(self) -> None:
        freeze_startup_objects()
        last_stats = time.monotonic()
        while not self._stop.is_set():
            if not self.session.waiting and not self.handoff_session.waiting:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), REGISTRY_POLL_S)
                self._arrived.clear()
            self._take_notices()
            self._expire_pending()
            if self.session.waiting:
                await self._screen_batch(await self._collect())
            elif not self.handoff_session.waiting:
                await asyncio.to_thread(self.screener.refresh_registry)
            if self._seen and time.monotonic() - self._seen_sent > SEEN_EVERY_S:
                self._hand_over([])
            self.metrics.awaiting_commit.set(sum(len(p.tokens) for p in self._pending.values()))
            self.metrics.queue_depth.set(self.session.waiting)
            if time.monotonic() - last_stats > STATS_EVERY_S:
                last_stats = time.monotonic()
                self._log_counts("worker counts")
        await self._drain()

    async def _drain(self) -> None:
        """After `stop()`: screen nothing more, but wait (bounded) for the commit notices of batches already handed
        off, so that their originals are acknowledged before the connection goes. Without this a worker stopped
        right after its last hand-off left those reports unacknowledged in its session, to be redelivered and
        answered by dedup only when that worker returns (a worker that never returns: never)."""
        if self._seen:
            self._hand_over([])  # the last heartbeat summary; it awaits no notice
        wait_s = min(self.settings.ingest.handoff_timeout_s, DRAIN_MAX_S)
        deadline = time.monotonic() + wait_s
        if self._pending:
            log.info(
                "draining: waiting for the commit notices of handed-off batches",
                extra={"worker": self.worker_id, "batches": len(self._pending), "at_most_s": wait_s},
            )
        while True:
            self._drop_inbox()
            self._take_notices()
            remaining = deadline - time.monotonic()
            if not self._pending or remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
            self._arrived.clear()
        if self._pending:
            log.warning(
                "stopping without the commit notices of some hand-offs; their reports stay unacknowledged in this "
                "worker's session (redelivered when it returns) and devices resend what they hold no receipt for",
                extra={
                    "worker": self.worker_id,
                    "batches": len(self._pending),
                    "reports": sum(len(p.tokens) for p in self._pending.values()),
                    "waited_s": wait_s,
                },
            )

    def _drop_inbox(self) -> None:
        """Release device messages unscreened and unacknowledged: the broker redelivers them on this session's return
        and devices resend what they hold no receipt for. Freeing their places lets the client read on to the end."""
        dropped = self.session.take(self.session.waiting)
        self.session.settle_all([message.token for message in dropped], ack=False)
        self.counts.dropped_at_shutdown += len(dropped)

    def _log_counts(self, what: str) -> None:
        c = self.counts
        log.info(
            what,
            extra={
                "worker": self.worker_id,
                "received": c.received,
                "forwarded": c.forwarded,
                "committed": c.committed,
                "heartbeats": c.heartbeats,
                "rejected": sum(c.rejected.values()),
                "rejected_by_reason": str(c.rejected),
                "redeliveries": c.redeliveries,
                "dropped_at_shutdown": c.dropped_at_shutdown,
                "awaiting_commit": sum(len(p.tokens) for p in self._pending.values()),
            },
        )

    def _take_notices(self) -> None:
        for notice in self.handoff_session.take(self.handoff_session.waiting):
            try:
                batch_id = open_committed(self.key, self.settings.mid, self.worker_id, notice.topic, notice.payload)
            except ProtocolError as exc:
                log.warning("commit notice refused", extra={"reason": str(exc.reason)})
                batch_id = None
            self.handoff_session.settle(notice.token)
            pending = self._pending.pop(batch_id, None) if batch_id is not None else None
            if pending is None:
                continue  # a repeat, or for a batch already given up and redelivered
            self.session.settle_all(pending.tokens)
            self.counts.committed += len(pending.tokens)
            self.metrics.committed.inc(len(pending.tokens))

    def _expire_pending(self) -> None:
        """No commit notice in time (sequencer down, notice lost): free the places unacknowledged and reconnect so the
        broker redelivers the originals; they are screened again and the sequencer's dedup answers committed ones."""
        horizon = time.monotonic() - self.settings.ingest.handoff_timeout_s
        stale = [batch_id for batch_id, p in self._pending.items() if p.sent < horizon]
        if not stale:
            return
        for batch_id in stale:
            for token in self._pending.pop(batch_id).tokens:
                self.session.settle(token, ack=False)
                self.counts.redeliveries += 1
                self.metrics.redeliveries.inc()
        log.warning("no commit notice in time; asking the broker to redeliver", extra={"batches": len(stale)})
        self.session.redeliver_unacknowledged()

    async def _collect(self) -> list[InboundMessage]:
        ingest = self.settings.ingest
        return await self.session.batch(ingest.batch_max, ingest.batch_window_ms)

    def _screen(self, batch: list[InboundMessage]) -> tuple[list[Verdict], list[InboundMessage]]:
        self.screener.refresh_registry()
        now_ms = time.time_ns() // 1_000_000
        settled: list[Verdict] = []
        verified: list[InboundMessage] = []
        for message in batch:
            verdict = Verdict(message, Outcome.REJECTED)
            screened = screen_one(self.screener, message, verdict, now_ms)
            if screened is None or screened.leaf_kind is None:
                settled.append(verdict)
            else:
                verified.append(message)
        return settled, verified

    async def _screen_batch(self, batch: list[InboundMessage]) -> None:
        self.counts.received += len(batch)
        self.metrics.received.inc(len(batch))
        settled, verified = await asyncio.to_thread(self._screen, batch)
        self.session.settle_all([v.message.token for v in settled])
        for v in settled:
            if v.outcome is Outcome.HEARTBEAT:
                self.counts.heartbeats += 1
                self.metrics.heartbeats.inc()
                # The screener accepted the signer as owner of this topic: mid/{mid}/dev/{device}/up/{kind}.
                device = v.message.topic.split("/")[3]
                self._seen[device] = self.screener.last_seen_ms.get(device, time.time_ns() // 1_000_000)
                if device in self.screener.statuses:
                    self._statuses[device] = self.screener.statuses[device][0]
            else:
                reason = str(v.reason)
                self.counts.rejected[reason] = self.counts.rejected.get(reason, 0) + 1
                self.metrics.rejected.labels(reason=reason).inc()
                log_rejection(v)
        for chunk in _by_size(verified, HANDOFF_TARGET_BYTES):
            self._hand_over(chunk)

    def _hand_over(self, chunk: list[InboundMessage]) -> None:
        """One authenticated hand-off; it carries the heartbeat summary gathered since the last one. A summary-only
        hand-off (no chunk) awaits no commit notice: nothing of it needs acknowledging to the broker."""
        batch_id = self._next_batch
        self._next_batch += 1
        entries = [(m.topic, m.payload) for m in chunk]
        handoff = VerifiedBatch(self.worker_id, batch_id, entries, self._seen, self._statuses)
        self._seen, self._statuses = {}, {}
        self._seen_sent = time.monotonic()
        topic, payload = seal_verified(self.key, self.settings.mid, handoff)
        if chunk:
            self._pending[batch_id] = _Pending([m.token for m in chunk], time.monotonic())
        self.handoff_session.publish(topic, payload, qos=1)
        self.counts.forwarded += len(chunk)
        self.metrics.forwarded.inc(len(chunk))


def _by_size(messages: list[InboundMessage], target: int) -> list[list[InboundMessage]]:
    """Consecutive chunks whose base64-encoded envelopes stay near `target` bytes (at least one message each)."""
    chunks: list[list[InboundMessage]] = []
    size = 0
    for m in messages:
        cost = len(m.payload) * 4 // 3 + len(m.topic) + 8
        if not chunks or size + cost > target:
            chunks.append([])
            size = 0
        chunks[-1].append(m)
        size += cost
    return chunks


async def run_worker(
    settings: CoordinatorSettings, worker_id: str, metrics_port: int | None = None, metrics_host: str = ""
) -> None:
    """Run until SIGTERM or SIGINT."""
    import signal

    async with ScreeningWorker(settings, worker_id, metrics_port, metrics_host) as worker:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()
