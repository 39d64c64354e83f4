"""The ingest service `serve` runs: MQTT -> screen -> contribution gate -> ledger -> receipts, one batch at a time.

One task owns the batch loop: take what the broker delivered (up to `batch_max` or `batch_window_ms`), screen it in
a worker thread, settle rejections and duplicates at once (ack + resent receipt), commit the rest to the ledger in
one durable transaction, then publish one receipt batch per device and the retained checkpoint and only then
acknowledge those messages to the broker. A coordinator killed at any point loses nothing: unacknowledged messages
are redelivered into the persistent session and dedup answers the ones that did make it into the ledger.

The service is handed what it uses (coordinator/serve/assembly.py builds it): the ledger, the pipeline, the
contribution gate when federation is on, the metrics; it owns only its broker session and its batch loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType

from coordinator.config import CoordinatorSettings
from coordinator.ingest.admission import ContributionAdmission
from coordinator.ingest.handoff import (
    VerifiedBatch,
    is_handoff_topic,
    load_or_create_handoff_key,
    open_verified,
    seal_committed,
    sequencer_filters,
)
from coordinator.ingest.metrics import IngestMetrics
from coordinator.ingest.mqtt import BrokerEndpoint, ManualAckClient
from coordinator.ingest.pipeline import (
    Candidate,
    InboundMessage,
    IngestPipeline,
    Outcome,
    ScreenResult,
    Verdict,
    freeze_startup_objects,
    log_rejection,
)
from coordinator.ingest.presence import PresenceRecorder
from coordinator.ledger.store import LedgerStore
from protocol.checkpoint import parse_checkpoint_text
from protocol.errors import ProtocolError
from protocol.identity import SignerKey
from protocol.messages import CheckpointAnnouncement
from protocol.note import parse_note
from protocol.topics import checkpoint_topic, coordinator_filters

log = logging.getLogger("midgate.ingest")
REGISTRY_POLL_S = 1.0


class IngestService:
    """`async with IngestService(...) as ingest: await ingest.run()`; `stop()` ends `run()`.

    Parameters
    ----------
    settings: the coordinator's settings (`mid`, `[ingest]`, `[federation] capture_poll_s`, the hand-off key path).
    mid_key: signs checkpoint announcements.
    ledger: the MID's log (the pipeline appends to it; the service reads checkpoints from it).
    pipeline: screen, dedup and commit (coordinator/ingest/pipeline.py).
    gate: the contribution gate (coordinator/gate/), or None when federation is off.
    metrics: ingest's Prometheus series.
    broker: the coordinator's own broker login.
    """

    def __init__(
        self,
        *,
        settings: CoordinatorSettings,
        mid_key: SignerKey,
        ledger: LedgerStore,
        pipeline: IngestPipeline,
        gate: ContributionAdmission | None,
        metrics: IngestMetrics,
        broker: BrokerEndpoint,
    ) -> None:
        self.settings = settings
        self.mid_key = mid_key
        self.ledger = ledger
        self.pipeline = pipeline
        self.contributions = gate
        self.metrics = metrics
        self._broker = broker
        self.presence = PresenceRecorder(pipeline.registry, pipeline.screener)
        self._stop = asyncio.Event()
        self._exits = contextlib.AsyncExitStack()
        # A quiet broker still wakes the loop: for registry changes, and for the captures waiting reports need.
        self._quiet_s = REGISTRY_POLL_S
        if gate is not None:
            self._quiet_s = min(REGISTRY_POLL_S, settings.federation.capture_poll_s)

    async def __aenter__(self) -> IngestService:
        s = self.settings
        self.metrics.ledger_size.set(self.ledger.size)
        self.handoff_key = load_or_create_handoff_key(s.handoff_key_path)
        # With screening workers the device topics are theirs (shared subscription); a plain subscription here would
        # receive every message a second time.
        filters = sequencer_filters(s.mid)
        if not s.ingest.workers:
            filters = coordinator_filters(s.mid) + filters
        self.session = ManualAckClient(self._broker, s.ingest.queue_max, s.ingest.receive_maximum)
        await self._exits.enter_async_context(self.session)
        await self.session.subscribe(*filters)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._exits.aclose()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        freeze_startup_objects()
        stopper = asyncio.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                if not self.session.waiting:
                    waiter = asyncio.create_task(self.session.arrived.wait())
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
                        await self._record_presence()
                        continue
                    self.session.arrived.clear()
                    if not self.session.waiting:
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
        self.session.settle_all([message.token for message in batch], ack=False)
        self.session.redeliver_unacknowledged()
        await asyncio.sleep(1.0)

    async def _collect(self) -> list[InboundMessage]:
        ingest = self.settings.ingest
        return await self.session.batch(ingest.batch_max, ingest.batch_window_ms)

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
        await self._record_presence()
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
            self._note_seen(handoff, time.time_ns() // 1_000_000)
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

    def _note_seen(self, handoff: VerifiedBatch, now_ms: int) -> None:
        """Heartbeats a worker verified and settled itself; a clock ahead of ours counts as now, not the future."""
        last_seen = self.pipeline.last_seen_ms
        for device, ms in handoff.seen.items():
            last_seen[device] = max(last_seen.get(device, 0), min(ms, now_ms))
        for device, status in handoff.statuses.items():
            self.pipeline.screener.note_status(device, status, min(handoff.seen.get(device, now_ms), now_ms))

    async def _record_presence(self) -> None:
        """What devices said about themselves, into the registry (batched: coordinator/ingest/presence.py). Never
        fails the batch: the messages are settled already, and the next write carries what this one missed."""
        if not self.presence.due():
            return
        try:
            await asyncio.to_thread(self.presence.write)
        except Exception:
            log.exception("device presence not recorded; trying again with the next batch")

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
                log_rejection(v)
        self.session.settle_all(tokens)
        if log.isEnabledFor(logging.DEBUG):  # one check per batch: nothing per report unless asked for
            _log_verdicts(verdicts)
        self.metrics.accepted.inc(counts[Outcome.ACCEPTED])
        self.metrics.heartbeats.inc(counts[Outcome.HEARTBEAT])
        self.metrics.dedup_hits.inc(counts[Outcome.DUPLICATE])
        self.metrics.receipts.inc(receipts)


def _log_verdicts(verdicts: list[Verdict]) -> None:
    """One DEBUG line per signed report or vote settled (`serve --log-level debug`); heartbeats are not listed."""
    for v in verdicts:
        if v.outcome is Outcome.HEARTBEAT:
            continue
        log.debug(
            "report %s: device %s, seq %s%s",
            "accepted" if v.outcome is Outcome.ACCEPTED else f"refused ({v.reason})",
            v.device,
            v.seq,
            f", leaf {v.leaf_index}" if v.leaf_index is not None else "",
            extra={"outcome": str(v.outcome), "reason": str(v.reason or ""), "device": v.device, "seq": v.seq},
        )
