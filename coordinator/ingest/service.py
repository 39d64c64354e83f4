"""`midgate coordinator serve`: the ingest service and the HTTP API in one asyncio process (uvloop when present).

One task owns the batch loop: take what the broker delivered (up to `batch_max` or `batch_window_ms`), screen it in
a worker thread, settle rejections and duplicates at once (ack + resent receipt), commit the rest to the ledger in
one durable transaction, then publish one receipt batch per device and the retained checkpoint and only then
acknowledge those messages to the broker. A coordinator killed at any point loses nothing: unacknowledged messages
are redelivered into the persistent session and dedup answers the ones that did make it into the ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import uvicorn

from coordinator.broker.logins import coordinator_password, sync_broker_logins
from coordinator.buyer.http import RevenueDesk
from coordinator.config import CoordinatorSettings
from coordinator.federation.mid_superlink import MidSuperLink
from coordinator.gate.gate import ContributionGate, open_contribution_gate
from coordinator.ingest.handoff import (
    VerifiedBatch,
    is_handoff_topic,
    load_or_create_handoff_key,
    open_verified,
    seal_committed,
    sequencer_filters,
)
from coordinator.ingest.metrics import IngestMetrics
from coordinator.ingest.mqtt import BrokerEndpoint, BrokerSession, collect_batch
from coordinator.ingest.pipeline import Candidate, InboundMessage, IngestPipeline, Outcome, ScreenResult, Verdict
from coordinator.ledger.dedup import DedupIndex
from coordinator.ledger.store import LedgerStore
from coordinator.registry.enrolment import Enroller, load_or_create_mid_key
from coordinator.registry.http import build_app
from coordinator.registry.ledger_records import log_enrolments
from coordinator.registry.store import Device, Registry
from protocol.checkpoint import parse_checkpoint_text
from protocol.enrolment import BrokerCredentials
from protocol.errors import ProtocolError, Reason
from protocol.messages import CheckpointAnnouncement
from protocol.note import parse_note
from protocol.topics import checkpoint_topic, coordinator_filters

log = logging.getLogger("midgate.ingest")
REGISTRY_POLL_S = 1.0


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the service owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class CoordinatorService:
    """`async with CoordinatorService(settings) as service: await service.run()`; `stop()` ends `run()`."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.metrics = IngestMetrics()
        self._stop = asyncio.Event()
        self._inbox: deque[InboundMessage] = deque()
        self._arrived = asyncio.Event()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: _QuietServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.superlink: MidSuperLink | None = None
        self.contributions: ContributionGate | None = None
        # A quiet broker still wakes the loop: for registry changes, and for the captures waiting reports need.
        self._quiet_s = REGISTRY_POLL_S
        if settings.federation.enabled:
            self._quiet_s = min(REGISTRY_POLL_S, settings.federation.capture_poll_s)

    @property
    def password_file(self) -> Path:
        return self.settings.broker.password_file or self.settings.data_dir / "broker-coordinator.password"

    async def __aenter__(self) -> CoordinatorService:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.get_running_loop()
        self.mid_key = load_or_create_mid_key(s.mid_key_file, s.mid)
        self.ledger = LedgerStore.open(s.data_dir / "ledger.sqlite", self.mid_key)
        self.registry = Registry(s.registry_path)
        self.dedup = DedupIndex(s.ingest_path)
        self.pipeline = await asyncio.to_thread(
            IngestPipeline,
            s.mid,
            Registry(s.registry_path),
            self.ledger,
            self.dedup,
            self.mid_key,
            s.ingest.max_message_bytes,
            s.ingest.rate_per_s,
            s.ingest.rate_burst,
        )
        await asyncio.to_thread(log_enrolments, self.registry, self.ledger)
        if s.federation.enabled:
            # Contribution reports are cross-checked with the round captures of the MID's own jobs.
            self.contributions = await asyncio.to_thread(
                open_contribution_gate,
                s.mid,
                self.mid_key,
                s.contributions_path,
                s.registry_path,
                s.jobs_dir,
                s.job_book_dir,
                s.federation.report_grace_s,
                s.federation.capture_poll_s,
                lambda key_id, seq: self.dedup.lookup(key_id, seq) is not None,
                self.metrics.registry,
            )
        self.metrics.ledger_size.set(self.ledger.size)
        endpoint = BrokerEndpoint(
            host=s.broker.host,
            port=s.broker.port,
            username=s.broker.username,
            password=coordinator_password(self.password_file),
            client_id=s.broker.client_id,
            ca_file=str(s.broker.ca_file) if s.broker.tls and s.broker.ca_file else None,
            keepalive_s=s.broker.keepalive_s,
            mqtt5=s.broker.mqtt5,
        )
        self.handoff_key = load_or_create_handoff_key(s.handoff_key_path)
        # With screening workers the device topics are theirs (shared subscription); a plain subscription here would
        # receive every message a second time.
        filters = sequencer_filters(s.mid)
        if not s.ingest.workers:
            filters = coordinator_filters(s.mid) + filters
        self.session = BrokerSession(endpoint, filters, self._deliver, s.ingest.queue_max, s.ingest.receive_maximum)
        self.session.start()
        if s.federation.enabled:
            # Before the HTTP endpoint: enrolment registers devices' Flower keys with this SuperLink.
            self.superlink = MidSuperLink(s)
            try:
                await asyncio.to_thread(self.superlink.start)
            except BaseException:
                await asyncio.to_thread(self.superlink.stop)
                await asyncio.to_thread(self.session.stop)
                raise
            log.info("superlink started", extra={"address": self.superlink.public_address})
        if s.enrolment.enabled:
            await self._start_http()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        if self.superlink is not None:
            await asyncio.to_thread(self.superlink.stop)
        await asyncio.to_thread(self.session.stop)
        if self.contributions is not None:
            self.contributions.close()
        self.dedup.close()
        self.registry.close()
        self.ledger.close()

    async def _start_http(self) -> None:
        s = self.settings
        enroller = Enroller(
            s.mid,
            self.registry,
            self.ledger,
            self.mid_key,
            self._credentials,
            self._enrolled,
            s.enrolment.max_body_bytes,
            self.superlink,
        )
        revenue = RevenueDesk(s.mid, s.royalties.currency, s.buyers.keys, self.ledger, s.buyers.max_body_bytes)
        app = build_app(enroller, self.ledger, self.metrics.registry, self._count_refusal, revenue)
        config = uvicorn.Config(app, host=s.enrolment.host, port=s.enrolment.port, log_level="warning", lifespan="off")
        self._http = _QuietServer(config)
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                await self._http_task
                raise RuntimeError("enrolment endpoint did not start")
            await asyncio.sleep(0.01)

    def _count_refusal(self, reason: object) -> None:
        self.metrics.rejected.labels(reason=str(reason)).inc()

    def _credentials(self, device_id: str, password: str) -> BrokerCredentials:
        b = self.settings.broker
        ca_pem = b.ca_file.read_text() if b.tls and b.ca_file else ""
        return BrokerCredentials(
            host=b.public_host or b.host,
            port=b.public_port or b.port,
            tls=b.tls,
            ca_pem=ca_pem,
            username=device_id,
            password=password,
        )

    def _enrolled(self, device: Device) -> None:
        log.info("device enrolled", extra={"device": device.device_id, "member": device.member_id})
        self.sync_broker_logins()

    def sync_broker_logins(self) -> None:
        passwords = self.settings.broker_config.output_dir / "passwords"
        if passwords.exists():
            sync_broker_logins(self.registry, passwords, self.settings)

    def _deliver(self, message: InboundMessage) -> None:
        """Called on paho's thread. One loop wake-up per burst rather than per message (a measured per-report cost):
        the flag is only cleared on the loop, after which any later append schedules a new wake-up."""
        assert self._loop is not None
        self._inbox.append(message)
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_pending = False
        self._arrived.set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        stopper = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if not self._inbox:
                    waiter = asyncio.create_task(self._arrived.wait())
                    done, _ = await asyncio.wait(
                        {waiter, stopper}, timeout=self._quiet_s, return_when=asyncio.FIRST_COMPLETED
                    )
                    if waiter not in done:
                        waiter.cancel()
                        if stopper in done:
                            break
                        # Quiet broker: still notice revocations (and log them) without waiting for traffic.
                        await asyncio.to_thread(self.pipeline.refresh_registry)
                        await self._resolve_contributions()
                        continue
                    self._arrived.clear()
                    if not self._inbox:
                        continue
                batch = await self._collect()
                try:
                    await self._process(batch)
                except Exception:
                    await self._recover(batch)
                await self._resolve_contributions()
        finally:
            stopper.cancel()

    async def _recover(self, batch: list[InboundMessage]) -> None:
        """An unexpected failure (a storage error, a bug) must not stop the service or lose messages: leave the whole
        batch unacknowledged, reconnect so the broker redelivers it, and let dedup sort out what did get committed."""
        log.exception("batch failed; it will be redelivered", extra={"messages": len(batch)})
        self.metrics.rejected.labels(reason="internal_error").inc(len(batch))
        for message in batch:
            self.session.settle(message.token, ack=False)
        await asyncio.to_thread(self.session.redeliver_unacknowledged)
        await asyncio.sleep(1.0)

    async def _collect(self) -> list[InboundMessage]:
        ingest = self.settings.ingest
        return await collect_batch(self._inbox, self._arrived, ingest.batch_max, ingest.batch_window_ms)

    async def _process(self, batch: list[InboundMessage]) -> None:
        self.metrics.queue_depth.set(self.session.in_memory)
        now_ms = time.time_ns() // 1_000_000
        handoffs: list[tuple[InboundMessage, VerifiedBatch]] = []
        if any(is_handoff_topic(self.settings.mid, m.topic) for m in batch):
            batch, handoffs = self._unpack_handoffs(batch)
        self.metrics.received.inc(len(batch))
        screened, owed = await asyncio.to_thread(self._screen, batch, now_ms)
        self._settle(screened.settled, owed)
        self._count_online(now_ms)
        if self.contributions is not None and screened.candidates:
            screened.candidates = await self._admit_contributions(screened.candidates, now_ms)
        if screened.candidates:
            committed, owed = await asyncio.to_thread(self._commit, screened.candidates, now_ms)
            self.metrics.batch_size.observe(len(committed))
            self.metrics.ledger_size.set(self.ledger.size)
            announcement = await asyncio.to_thread(self._checkpoint_announcement, now_ms)
            self.session.publish(checkpoint_topic(self.settings.mid), announcement, qos=1, retain=True)
            self._settle(committed, owed)
        # Everything a hand-off carried is now committed or settled: only now may its worker ack the originals.
        for message, handoff in handoffs:
            topic, notice = seal_committed(self.handoff_key, self.settings.mid, handoff.worker, handoff.batch_id)
            self.session.publish(topic, notice, qos=1)
            self.session.settle(message.token)

    async def _admit_contributions(self, candidates: list[Candidate], now_ms: int) -> list[Candidate]:
        """Cross-check contribution reports with their round's capture (coordinator/gate/gate.py): a
        report waiting for it is stored durably, then acknowledged without a receipt; a refused one gets its Refusal."""
        assert self.contributions is not None
        admission = await asyncio.to_thread(self.contributions.admit, candidates, now_ms)
        for verdict in admission.held:
            if verdict.message.token is not None:
                self.session.settle(verdict.message.token)
        self._settle(admission.refused, admission.notices)
        return admission.ready

    async def _resolve_contributions(self) -> None:
        """Log (and receipt) waiting reports whose round capture appeared; refuse those it contradicts or that
        waited past the grace period. Runs between batches, on the thread that appends to the ledger."""
        gate = self.contributions
        if gate is None or not gate.due(time.monotonic()):
            return
        now_ms = time.time_ns() // 1_000_000
        try:
            resolution = await asyncio.to_thread(gate.resolve, now_ms)
            self._settle(resolution.refused, resolution.notices)
            if resolution.ready:
                committed, owed = await asyncio.to_thread(self._commit, resolution.ready, now_ms)
                await asyncio.to_thread(gate.logged, committed)
                self.metrics.ledger_size.set(self.ledger.size)
                announcement = await asyncio.to_thread(self._checkpoint_announcement, now_ms)
                self.session.publish(checkpoint_topic(self.settings.mid), announcement, qos=1, retain=True)
                self._settle(committed, owed)
        except Exception:
            # The waiting rows stay; the next poll retries them and dedup keeps a committed one from a second leaf.
            log.exception("resolving waiting contribution reports failed")

    def _unpack_handoffs(
        self, batch: list[InboundMessage]
    ) -> tuple[list[InboundMessage], list[tuple[InboundMessage, VerifiedBatch]]]:
        """Replace each authenticated hand-off by the envelopes it carries (marked prescreened, no ack token of their
        own); a hand-off whose tag or shape is wrong is refused, counted and acknowledged at once."""
        mid = self.settings.mid
        messages: list[InboundMessage] = []
        handoffs: list[tuple[InboundMessage, VerifiedBatch]] = []
        for message in batch:
            if not is_handoff_topic(mid, message.topic):
                messages.append(message)
                continue
            try:
                handoff = open_verified(self.handoff_key, mid, message.topic, message.payload)
            except ProtocolError as exc:
                log.warning("hand-off refused", extra={"reason": str(exc.reason), "topic": message.topic[:200]})
                self.metrics.rejected.labels(reason=str(exc.reason)).inc()
                self.session.settle(message.token)
                continue
            handoffs.append((message, handoff))
            self._note_seen(handoff.seen, time.time_ns() // 1_000_000)
            messages.extend(
                InboundMessage(topic, envelope, None, message.received_ns, prescreened=True)
                for topic, envelope in handoff.entries
            )
        return messages, handoffs

    def _screen(self, batch: list[InboundMessage], now_ms: int) -> tuple[ScreenResult, list[tuple[str, bytes]]]:
        screened = self.pipeline.screen(batch, now_ms)
        return screened, self.pipeline.receipt_batches(screened.settled, now_ms)

    def _commit(self, candidates: list[Candidate], now_ms: int) -> tuple[list[Verdict], list[tuple[str, bytes]]]:
        committed = self.pipeline.commit(candidates, now_ms)
        return committed, self.pipeline.receipt_batches(committed, now_ms)

    def _checkpoint_announcement(self, now_ms: int) -> bytes:
        """The latest signed checkpoint, sealed for the retained topic (SQLite read + signature: worker thread)."""
        note = self.ledger.checkpoint()
        size = parse_checkpoint_text(parse_note(note).text).size
        return CheckpointAnnouncement(tree_size=size, checkpoint=note.decode(), issued_ms=now_ms).seal(self.mid_key)

    def _note_seen(self, seen: dict[str, int], now_ms: int) -> None:
        """Heartbeats a worker verified and settled itself; a clock ahead of ours counts as now, not the future."""
        last_seen = self.pipeline.last_seen_ms
        for device, ms in seen.items():
            last_seen[device] = max(last_seen.get(device, 0), min(ms, now_ms))

    def _count_online(self, now_ms: int) -> None:
        horizon = now_ms - self.settings.ingest.heartbeat_offline_s * 1000
        self.metrics.devices_online.set(sum(1 for seen in self.pipeline.last_seen_ms.values() if seen >= horizon))

    def _settle(self, verdicts: list[Verdict], receipts_out: list[tuple[str, bytes]]) -> None:
        """Publish the receipt batches these verdicts owe, then acknowledge every message to the broker."""
        for topic, payload in receipts_out:
            self.session.publish(topic, payload, qos=1)
        now_ns = time.monotonic_ns()
        counts: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
        receipts = 0
        tokens = []
        for v in verdicts:
            if v.path is not None:
                receipts += 1
                self.metrics.latency.observe((now_ns - v.message.received_ns) / 1e9)
            if v.message.token is not None:  # handed-over envelopes are acknowledged with their hand-off
                tokens.append(v.message.token)
            counts[v.outcome] += 1
            if v.outcome is not Outcome.ACCEPTED and v.outcome is not Outcome.HEARTBEAT:
                self.metrics.rejected.labels(reason=str(v.reason)).inc()
                if v.outcome is Outcome.REJECTED and v.reason is not Reason.RATE_LIMITED:
                    log.warning(
                        "message rejected",
                        extra={"reason": str(v.reason), "topic": v.message.topic[:200], "error": v.error},
                    )
        self.session.settle_all(tokens)
        self.metrics.accepted.inc(counts[Outcome.ACCEPTED])
        self.metrics.heartbeats.inc(counts[Outcome.HEARTBEAT])
        self.metrics.dedup_hits.inc(counts[Outcome.DUPLICATE])
        self.metrics.receipts.inc(receipts)


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message and the `extra` fields."""

    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts_ms": int(record.created * 1000),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD:
                doc[key] = value if isinstance(value, int | float | bool | None) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"))


async def serve(settings: CoordinatorSettings) -> None:
    """Run until SIGTERM or SIGINT."""
    import signal

    async with CoordinatorService(settings) as service:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop)
        await service.run()
