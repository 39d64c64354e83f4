"""`midgate agent run`: one asyncio process serving every membership of this agent.

Per membership, four loops with one owner (`MembershipRunner.run`): the spool loop signs ClientApp records into the
outbox; the publish loop sends what is due (QoS 1), then schedules a resend with exponential backoff and jitter in
case no receipt comes; the receipt loop verifies receipt batches (checkpoint signature, consistency with the trusted
checkpoint, each report's inclusion path) and only then moves reports out of the outbox, kept with their receipts;
the heartbeat loop says the device is alive (with the member's status: idle, training, paused, striking, left). A
fifth, the member loop, picks up the member's choices (edge.agent.controls.watch): it stops a running job's SuperNode
they no longer allow and queues the StrikeVotes they call for. A sixth, the witness loop, makes the device one of the
log's witnesses (edge.agent.witnessing): it cosigns the checkpoints it has checked. The outbox, proofs and the MID's
ledger API run on one dedicated thread per membership, so fsyncs, crypto and HTTP never block the event loop. Beside
them the status loop keeps `daemon-status.json` (edge.agent.daemon_status) true for `agent status`: connection, its
failure, jobs joined. Under systemd (`Type=notify`) it says READY=1 once every membership is served and pings the
watchdog from the event loop (edge.agent.systemd_notify).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from edge.agent.config import AgentSettings
from edge.agent.controls.decisions import (
    LEAVE_NAME,
    OwedChoice,
    OwedVote,
    owed_choices,
    owed_votes,
    strike_vote,
)
from edge.agent.controls.watch import MemberControls
from edge.agent.daemon_status import DaemonStatus, read_daemon_status, with_job, write_daemon_status
from edge.agent.job_node import JobNode
from edge.agent.ledger_client import LedgerClient, ProofUnavailableError
from edge.agent.ledger_view import LedgerView, SettledReport
from edge.agent.member_page import serving_member_page
from edge.agent.membership import Membership, load_memberships
from edge.agent.outbox import LEAF_KIND, Outbox, OutboxFullError
from edge.agent.refusals import settle_refusal
from edge.agent.session import DeviceSession, broker_route
from edge.agent.systemd_notify import systemd_service
from edge.agent.witnessing import cosign_candidate
from edge.federated.spool import SpooledRecord, pending_files, read_record, reject_file
from edge.sensors.collection import open_collection
from protocol.errors import ProtocolError
from protocol.leaves import LeafKind
from protocol.messages import DeviceStatus, Heartbeat, ReceiptBatch
from protocol.reconnect import backoff_s
from protocol.topics import Direction, DownKind, UpKind, parse_topic, up_topic
from protocol.witness import Cosigner

log = logging.getLogger("midgate.agent")
T = TypeVar("T")

_RECEIPT_BATCH = 500


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MembershipRunner:
    def __init__(self, settings: AgentSettings, membership: Membership) -> None:
        self.settings = settings
        self.membership = membership
        self.route = broker_route(membership, settings.hub_route(membership.mid))
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"outbox-{membership.mid}")
        self.outbox = Outbox(membership.outbox_path, settings.outbox_max_bytes)
        self.ledger_api = LedgerClient(membership.record.enrolment_url)
        self.view = LedgerView(
            membership.mid_key,
            membership.key.key_id.hex(),
            self.ledger_api.consistency,
            self.outbox.get_meta("trusted_checkpoint"),
        )
        self.cosigner = Cosigner(membership.key)
        self.cosigned = 0
        self._inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned_full = False
        self.session: DeviceSession | None = None
        self.receipts_verified = 0
        self.receipts_refused = 0
        self.controls = MemberControls(membership.directory, membership.mid)
        self.job_node = JobNode(
            membership,
            settings.spool_root / membership.mid,
            settings.window_source,
            admit=self.controls.admit,
            recheck=self.controls.recheck,
            flower_acceleration=settings.flower_acceleration,
            task_specs=self.ledger_api.task_spec,
            keep_warm_executor=settings.keep_warm_executor,
            sensors=self.controls.sensors_for,
        )
        self._beat_now = asyncio.Event()
        self._left = asyncio.Event()
        """Set once the member left and the MID receipted the leave notice: the session closes for good."""
        self._left_reason = ""
        self._votes_due = True  # at start: a strike chosen while the daemon was down still needs its vote
        self._job_tasks: set[asyncio.Task[None]] = set()

    async def _in_db(self, fn: Callable[..., T], *args: object) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._db, fn, *args)

    def _topic(self, kind: str) -> str:
        return up_topic(self.membership.mid, self.membership.device, UpKind(kind))

    def _heartbeat(self, seq: int, status: DeviceStatus) -> bytes:
        usage = self.outbox.usage()
        return Heartbeat(
            seq=seq, device_time_ms=_now_ms(), status=status, outbox_pending=usage.pending, agent_version="0.1"
        ).seal(self.membership.key)

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        closed = await self._in_db(self._leave_receipted)
        if closed is not None:  # left before this start: nothing to connect for
            try:
                await self._close_for_good(closed)
                await stop.wait()  # the agent still serves the member page (statement) until it stops
            finally:
                await self._in_db(self.outbox.close)
                self._db.shutdown(wait=True)
            return
        will_seq = await self._in_db(self.outbox.next_ephemeral_seq)
        will = (self._topic(UpKind.HEARTBEAT), self._heartbeat(will_seq, DeviceStatus.OFFLINE))
        s = self.settings
        self.session = DeviceSession(
            self.membership,
            self.route,
            deliver=self._deliver,
            on_connected=self._reconnected,
            will=will,
            protocol=s.mqtt_protocol,
            keepalive_s=s.keepalive_s,
            max_inflight=s.max_inflight,
            reconnect=(s.reconnect_min_s, s.reconnect_max_s),
        )
        try:
            async with self.session:
                loops = (
                    self._status_loop,
                    self._spool_loop,
                    self._publish_loop,
                    self._receipt_loop,
                    self._heartbeat_loop,
                    self._member_loop,
                    self._witness_loop,
                )
                tasks = [asyncio.create_task(self._supervised(loop, stop)) for loop in loops]
                tasks.append(asyncio.create_task(self.job_node.run(stop)))
                ended = [asyncio.create_task(stop.wait()), asyncio.create_task(self._left.wait())]
                try:
                    await asyncio.wait(ended, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in (*tasks, *ended):
                        task.cancel()
                    await asyncio.gather(*tasks, *ended, return_exceptions=True)
            if self._left.is_set() and not stop.is_set():
                await self._close_for_good(self._left_reason)
                await stop.wait()  # the agent still serves the member page (statement) until it stops
        finally:
            await self._in_db(self.outbox.close)
            self._db.shutdown(wait=True)

    def _leave_receipted(self) -> str | None:
        """Why this membership needs no connection any more: the member left and the MID receipted its LeaveNotice
        (it then revoked the device's key and broker login, so every reconnect would be refused); None otherwise."""
        if not self.controls.left:
            return None
        receipt = self.outbox.receipt_of(LEAVE_NAME)
        if receipt is None:
            return None
        seq, leaf = receipt
        return f"left the MID; its leave notice was receipted (seq {seq}, leaf {leaf}), so no broker retries"

    async def _close_for_good(self, reason: str) -> None:
        """Say in the status file that the connection is closed for good, and why (`agent status` shows it)."""
        log.info("connection closed for good: %s", reason, extra={"mid": self.membership.mid})
        status = await self._disconnected_status()
        await asyncio.to_thread(
            write_daemon_status, self.membership.directory, status.model_copy(update={"closed": reason})
        )

    async def _disconnected_status(self) -> DaemonStatus:
        """This daemon's status before it connects: the jobs joined carried over from the status file it finds."""
        kept = await asyncio.to_thread(read_daemon_status, self.membership.directory)
        return DaemonStatus(
            pid=os.getpid(),
            broker=str(self.route),
            connected=False,
            since_ms=_now_ms(),
            jobs_joined=kept.jobs_joined if kept else (),
            jobs_joined_count=kept.jobs_joined_count if kept else 0,
        )

    async def _supervised(self, loop: Callable[[asyncio.Event], Awaitable[None]], stop: asyncio.Event) -> None:
        """Run one loop until `stop`; an unexpected error (a full disk, a bug) is logged and the loop restarted,
        because everything it works on is in the outbox and survives the retry."""
        while not stop.is_set():
            try:
                await loop(stop)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("agent loop failed; restarting it", extra={"loop": loop.__name__})
                await _sleep_or(stop, 1.0)

    def _deliver(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/down/" + DownKind.INVITE.value):
            self._invited(payload)
            return
        self._inbox.put_nowait((topic, payload))

    def _invited(self, payload: bytes) -> None:
        task = asyncio.create_task(self.job_node.invited(payload))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)

    def _reconnected(self) -> None:
        log.info("connected", extra={"mid": self.membership.mid})
        self._resend_now = True
        self._wake.set()
        # Say the device is here at once: a job started before the next period would pass it by as never heard from.
        self._beat_now.set()

    _resend_now = False

    async def _spool_loop(self, stop: asyncio.Event) -> None:
        directory = self.settings.spool_root / self.membership.mid
        while not stop.is_set():
            taken = await self._in_db(self._take_spool, directory)
            if taken:
                self._wake.set()
                continue
            await _sleep_or(stop, self.settings.spool_poll_s)

    def _take_spool(self, directory: Path) -> int:
        """Move up to one batch of spool files into the outbox in one commit, then unlink them; returns how many."""
        items: list[tuple[str, Callable[[int], bytes], str | None]] = []
        paths = {}
        for path in pending_files(directory, self.settings.publish_batch):
            name = path.name
            if self.outbox.knows_spool_name(name):
                path.unlink(missing_ok=True)
                continue
            try:
                record = read_record(path, self.job_node.nonce_for)
            except (ProtocolError, OSError) as exc:
                log.warning("spool record rejected", extra={"file": name, "error": str(exc)})
                with contextlib.suppress(OSError):
                    reject_file(path, exc)
                continue
            items.append((UpKind.REPORT.value, functools.partial(self._sign_record, record), name))
            paths[name] = path
        if not items:
            return 0
        try:
            taken = self.outbox.enqueue_many(items, _now_ms())
        except OutboxFullError as exc:
            log.error("outbox full; records wait in the spool", extra={"mid": self.membership.mid, "error": str(exc)})
            return 0
        for taken_name, _ in taken:
            assert taken_name is not None
            paths[taken_name].unlink(missing_ok=True)
        self._check_disk()
        return len(taken)

    def _sign_record(self, record: SpooledRecord, seq: int) -> bytes:
        return record.seal(self.membership.key, seq, _now_ms())

    def _check_disk(self) -> None:
        used, bound = self.outbox.pending_bytes, self.outbox.max_bytes
        if used >= self.settings.outbox_warn_fraction * bound:
            if not self._warned_full:
                log.warning(
                    "outbox nearly full: reports are not being receipted",
                    extra={"mid": self.membership.mid, "bytes": used, "bound": bound},
                )
                self._warned_full = True
        else:
            self._warned_full = False

    def _backoff_ms(self, attempts: int) -> int:
        return int(backoff_s(attempts, self.settings.resend_after_s, self.settings.resend_max_s) * 1000)

    async def _publish_loop(self, stop: asyncio.Event) -> None:
        assert self.session is not None
        session = self.session
        while not stop.is_set():
            if session.connected.is_set():
                if self._resend_now:
                    self._resend_now = False
                    await self._in_db(self.outbox.resend_all_now)
                room = self.settings.max_inflight * 2 - session.unacked
                if room > 0:
                    now = _now_ms()
                    due = await self._in_db(self.outbox.due, now, min(room, self.settings.publish_batch))
                    if due:
                        for report in due:
                            session.publish(self._topic(report.kind), report.envelope, qos=1)
                        await self._in_db(
                            self.outbox.mark_sent,
                            [r.seq for r in due],
                            [now + self._backoff_ms(r.attempts) for r in due],
                        )
                        continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)

    async def _receipt_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            batch = [await self._inbox.get()]
            while len(batch) < _RECEIPT_BATCH and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            settled = await self._in_db(self._settle, batch)
            if settled:
                self._wake.set()

    def _settle(self, batch: list[tuple[str, bytes]]) -> int:
        before = self.view.trusted_note
        good: list[SettledReport] = []
        for topic, payload in batch:
            try:
                parsed = parse_topic(topic)
                if parsed.direction is Direction.DOWN and parsed.kind is DownKind.REFUSAL:
                    settle_refusal(self.outbox, self.membership, payload, _now_ms())
                    continue
                if parsed.direction is not Direction.DOWN or parsed.kind is not DownKind.RECEIPT:
                    continue
                outcome = self.view.settle_batch(ReceiptBatch.parse(payload), self._held)
            except ProofUnavailableError as exc:
                log.warning("no consistency proof yet; the reports stay queued", extra={"error": str(exc)})
                continue
            except ProtocolError as exc:
                self.receipts_refused += 1
                log.warning("receipt batch refused", extra={"reason": str(exc.reason), "error": str(exc)})
                continue
            for seq, error in outcome.refused:
                self.receipts_refused += 1
                log.warning("receipt refused", extra={"seq": seq, "reason": str(error.reason), "error": str(error)})
            good.extend(outcome.settled)
        moved = self.outbox.settle(good, _now_ms()) if good else 0
        self.receipts_verified += moved
        self._keep_trust(before)
        return moved

    def _keep_trust(self, before: bytes | None) -> None:
        """Persist the trusted checkpoint when it moved, so a restart resumes from it."""
        after = self.view.trusted_note
        if after is not None and after != before:
            self.outbox.set_meta("trusted_checkpoint", after)

    def _held(self, seq: int) -> tuple[LeafKind, bytes] | None:
        pending = self.outbox.pending(seq)
        return None if pending is None else (LEAF_KIND[pending.kind], pending.envelope)

    async def _heartbeat_loop(self, stop: asyncio.Event) -> None:
        assert self.session is not None
        while not stop.is_set():
            status = self.controls.heartbeat_status(training=self.job_node.job is not None)
            if self.session.connected.is_set():
                seq = await self._in_db(self.outbox.next_ephemeral_seq)
                payload = await self._in_db(self._heartbeat, seq, status)
                self.session.publish(self._topic(UpKind.HEARTBEAT), payload, qos=0)
            self._beat_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self.settings.heartbeat_s)

    async def _witness_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                size = await self._in_db(self._witness)
                if size is not None:
                    self.cosigned += 1
                    log.debug("checkpoint cosigned", extra={"mid": self.membership.mid, "size": size})
            except ProofUnavailableError as exc:
                log.debug("no checkpoint to cosign now", extra={"mid": self.membership.mid, "error": str(exc)})
            except ProtocolError as exc:
                log.warning(
                    "checkpoint not cosigned: it does not check out",
                    extra={"mid": self.membership.mid, "reason": str(exc.reason), "error": str(exc)},
                )
            await _sleep_or(stop, self.settings.witness_every_s)

    def _witness(self) -> int | None:
        before = self.view.trusted_note
        try:
            return cosign_candidate(self.view, self.ledger_api, self.cosigner, time.time_ns() // 1_000_000_000)
        finally:
            self._keep_trust(before)

    async def _member_loop(self, stop: asyncio.Event) -> None:
        """Apply the member's choices as the member commands change them: stop what they no longer allow, say the
        new status at once, queue the strike votes they call for."""
        while not stop.is_set():
            reading = await self._in_db(self.controls.poll)
            if reading is not None and self.controls.apply(reading):
                self._votes_due = True
                await self.job_node.enforce()
                self._beat_now.set()
            if self._votes_due:
                queued, owed = await self._in_db(self._queue_votes)
                self._votes_due = queued < owed  # the outbox was full: try again next time
                if queued:
                    self._wake.set()
            if await self._in_db(self._queue_choices):
                self._wake.set()
            left = await self._in_db(self._leave_receipted)
            if left is not None:
                await self.job_node.enforce()  # no SuperNode outlives the membership
                self._left_reason = left
                self._left.set()
                await stop.wait()  # `run` cancels this loop with the others
                return
            await _sleep_or(stop, self.settings.member_poll_s)

    def _queue_votes(self) -> tuple[int, int]:
        """Sign and queue the StrikeVotes owed, in one commit; returns (queued, owed). Their outbox names make a crash
        or a restart in between harmless (a vote already queued or receipted is never queued again)."""
        owed = owed_votes(self.controls.state, self.outbox.knows_spool_name)
        items: list[tuple[str, Callable[[int], bytes], str | None]] = [
            (UpKind.STRIKE.value, functools.partial(self._sign_vote, vote), vote.name) for vote in owed
        ]
        try:
            taken = self.outbox.enqueue_many(items, _now_ms()) if items else []
        except OutboxFullError as exc:
            log.error("outbox full; strike votes wait", extra={"mid": self.membership.mid, "error": str(exc)})
            return 0, len(items)
        for name, seq in taken:
            log.info("strike vote queued: %s, seq %d", name, seq)
        return len(taken), len(items)

    def _queue_choices(self) -> int:
        """Sign and queue the KnobUpdate, ConsentPolicy or LeaveNotice the member's choices call for (named in the
        outbox like strike votes, so each is queued once); returns how many were queued."""
        delivered = self.outbox.usage().pending == 0 and not pending_files(
            self.settings.spool_root / self.membership.mid, 1
        )
        owed = owed_choices(self.controls.state, self.outbox.knows_spool_name, delivered)
        if not owed:
            return 0
        items: list[tuple[str, Callable[[int], bytes], str | None]] = [
            (choice.kind, functools.partial(self._sign_choice, choice), choice.name) for choice in owed
        ]
        try:
            taken = self.outbox.enqueue_many(items, _now_ms())
        except OutboxFullError as exc:
            log.error("outbox full; member choices wait", extra={"mid": self.membership.mid, "error": str(exc)})
            return 0
        for name, seq in taken:
            log.info("member choice queued: %s, seq %d", name, seq)
        return len(taken)

    def _sign_choice(self, choice: OwedChoice, seq: int) -> bytes:
        return choice.make(seq, _now_ms()).seal(self.membership.key)

    def _sign_vote(self, vote: OwedVote, seq: int) -> bytes:
        return strike_vote(vote, seq, _now_ms()).seal(self.membership.key)

    async def _status_loop(self, stop: asyncio.Event) -> None:
        """Rewrite the membership's daemon-status.json whenever the connection or the running job changes."""
        assert self.session is not None
        status = await self._disconnected_status()
        written = None
        while not stop.is_set():
            connected = self.session.connected.is_set()
            if connected != status.connected:
                status = status.model_copy(update={"connected": connected, "since_ms": _now_ms()})
            job = self.job_node.job
            running = None if job is None else job.job_id
            status = with_job(status.model_copy(update={"failure": self.session.failure}), running)
            if status != written:
                await asyncio.to_thread(write_daemon_status, self.membership.directory, status)
                written = status
            await _sleep_or(stop, STATUS_EVERY_S)


STATUS_EVERY_S = 1.0
"""How often the status loop looks for a change (it writes only when there is one)."""


async def _sleep_or(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_agent(settings: AgentSettings, stop: asyncio.Event | None = None) -> None:
    """Serve every membership under `data_dir` until `stop` is set (or SIGTERM/SIGINT when run from the CLI)."""
    memberships = load_memberships(settings.data_dir / "mids")
    if not memberships:
        raise SystemExit(f"no memberships under {settings.data_dir / 'mids'}: run `midgate agent enrol` first")
    stop = stop or asyncio.Event()
    try:
        runners = [MembershipRunner(settings, m) for m in memberships]
    except ValueError as error:  # a [[via_hub]] password file it cannot use
        raise SystemExit(str(error)) from None
    for route in settings.via_hub:
        if route.mid not in {m.mid for m in memberships}:
            log.warning("[[via_hub]] names %s, which this device has not joined", route.mid, extra={"mid": route.mid})
    for r in runners:
        m = r.membership
        log.info(
            "agent running for %s as device %s; broker %s",
            m.mid,
            m.device,
            r.route,
            extra={"mid": m.mid, "device": m.device},
        )
    async with (
        open_collection(settings.sensors, settings.sample_store, settings.sensor_health_s),
        serving_member_page(settings, memberships),
        systemd_service(),
    ):
        await asyncio.gather(*(r.run(stop) for r in runners))
