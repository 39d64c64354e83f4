"""The ingest pipeline, synchronous and free of MQTT: size -> topic -> rate -> verify -> signer owns topic -> dedup
-> ledger append (one durable batch) -> receipts.

`screen` settles everything that needs no ledger commit (rejections, duplicates, heartbeats) so that the service
can acknowledge those to the broker at once; `commit` appends the rest in one transaction and gives each its
inclusion path; `receipt_batches` turns verdicts into one ReceiptBatch per device.
Both run in one worker thread (crypto and SQLite never on the event loop). Rejections never change the ledger.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from coordinator.ingest.batch_proofs import batch_inclusion_proofs
from coordinator.ingest.member_records import MEMBER_KINDS, LoggedChoice, record_member_choices
from coordinator.ingest.presence import logged_strike_vote
from coordinator.ledger.dedup import DedupIndex
from coordinator.ledger.store import LedgerStore
from coordinator.registry.ledger_records import log_revocations
from coordinator.registry.store import Device, Registry
from protocol.envelope import KeyRing, VerifiedPayload, decode, envelope_digest, open_envelope, peek_envelope
from protocol.errors import (
    BadTopicError,
    EquivocationError,
    MalformedError,
    ProtocolError,
    RateLimitedError,
    Reason,
    ReplayedError,
    RevokedKeyError,
    TooLargeError,
    TopicMismatchError,
    UnknownKeyError,
)
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind, decode_leaf
from protocol.messages import (
    ConsentPolicy,
    ContributionReport,
    DeviceStatus,
    Heartbeat,
    KnobUpdate,
    LeaveNotice,
    StrikeVote,
    WireMessage,
    receipt_batch_json,
    require_newer_seq,
)
from protocol.topics import Direction, DownKind, Topic, UpKind, down_topic, parse_topic

log = logging.getLogger("midgate.ingest")
T = TypeVar("T")

# What each up kind carries and which ledger leaf it becomes (None: not logged, e.g. heartbeats).
_KINDS: dict[UpKind, tuple[type[WireMessage], LeafKind | None]] = {
    UpKind.REPORT: (ContributionReport, LeafKind.CONTRIBUTION),
    UpKind.STRIKE: (StrikeVote, LeafKind.STRIKE),
    UpKind.LEAVE: (LeaveNotice, LeafKind.LEAVE),
    UpKind.KNOB: (KnobUpdate, LeafKind.KNOB),
    UpKind.CONSENT: (ConsentPolicy, LeafKind.CONSENT),
    UpKind.HEARTBEAT: (Heartbeat, None),
}
INGEST_KINDS = frozenset(_KINDS)
"""The up kinds ingest takes; a message of any other is refused `bad_topic` (docs/protocol.md, "A device's MQTT
session")."""


TOPIC_CACHE_SIZE = 65_536
"""Parsed topic names a Screener keeps (a few per enrolled device); beyond this the cache starts over."""


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    HEARTBEAT = "heartbeat"
    REJECTED = "rejected"


@dataclass(slots=True)
class InboundMessage:
    """One MQTT message as received (read-only by convention: not frozen, which costs a measurable share of the
    receive path per message); `token` is opaque to the pipeline (the client's ack handle)."""

    topic: str
    payload: bytes
    token: object = None
    received_ns: int = 0
    prescreened: bool = False
    """Screened and verified by a screening worker and handed over authenticated (coordinator/ingest/handoff.py):
    the sequencer then only re-reads key id and seq and checks the key is still active."""


@dataclass(slots=True)
class Verdict:
    message: InboundMessage
    outcome: Outcome
    reason: Reason | None = None
    device: str | None = None
    key_id: str | None = None
    seq: int | None = None
    leaf_index: int | None = None
    path: list[bytes] | None = None
    """Inclusion path of `leaf_index` under `checkpoint`: set when a receipt is owed (accepted or duplicate)."""
    checkpoint: bytes | None = None
    error: str = ""


@dataclass(slots=True)
class Candidate:
    """A verified, new report waiting for the ledger commit."""

    verdict: Verdict
    device: Device
    leaf: Leaf
    digest: bytes
    conflicts: list[bytes] = field(default_factory=list)
    """Different envelopes for the same (key, seq) seen in the same batch: evidence, stored once this one is logged."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class ScreenResult:
    settled: list[Verdict] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)


@dataclass(slots=True)
class Screened:
    """What screening established about one message: who signed it, its seq, and the ledger leaf it becomes."""

    signer: Device
    key_id: str
    seq: int
    leaf_kind: LeafKind | None
    """None: not logged (heartbeats), settled by screening alone."""


class Screener:
    """The per-message checks that need no ledger: size -> topic -> rate -> verify -> signer owns topic -> schema,
    and heartbeat ordering. The sequencer (`serve`) and every screening worker (`ingest-worker`) run this same code.
    One thread calls it at a time.

    `logged(key_id, seq)`: whether the ledger holds a statement of that key under that seq (the sequencer's dedup
    index), so that a heartbeat cannot reuse it; a screening worker has no index and passes none.
    """

    def __init__(
        self,
        mid: str,
        registry: Registry,
        max_message_bytes: int,
        default_rate_per_s: float,
        default_burst: int,
        clock: Callable[[], float] = time.monotonic,
        logged: Callable[[str, int], bool] = lambda key_id, seq: False,
    ) -> None:
        self.logged = logged
        self.mid = mid
        self.registry = registry
        self.max_message_bytes = max_message_bytes
        self.default_rate = default_rate_per_s
        self.default_burst = default_burst
        self._clock = clock
        self._registry_version = -1
        self._keyring = KeyRing()
        self._by_key_id: dict[str, Device] = {}
        self._by_device: dict[str, Device] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._heartbeat_seq: dict[str, int] = {}
        self._will_seq: dict[str, int] = {}
        self._topics: dict[str, Topic] = {}
        self.last_seen_ms: dict[str, int] = {}
        self.statuses: dict[str, tuple[DeviceStatus, int]] = {}
        """Device id -> the status its latest heartbeat said and since when (coordinator/ingest/presence.py)."""
        self.statuses_changed = False

    def refresh_registry(self) -> bool:
        """Reload device keys when the registry changed (enrolment, or revocation from another process)."""
        version = self.registry.version()
        if version == self._registry_version:
            return False
        devices = self.registry.devices()
        keyring = KeyRing()
        for device in devices:
            if not device.revoked:
                keyring.add(device.verifier)
        self._keyring = keyring
        self._by_key_id = {d.verifier.key_id.hex(): d for d in devices}
        self._by_device = {d.device_id: d for d in devices}
        self._registry_version = version
        return True

    def screen(self, message: InboundMessage, verdict: Verdict, now_ms: int) -> Screened:
        """Every check, signature included; fills `verdict`'s device, key id and seq as they become known."""
        if len(message.payload) > self.max_message_bytes:
            raise TooLargeError("message too large", limit=self.max_message_bytes, found=len(message.payload))
        topic = self._parse_topic(message.topic)
        if topic.mid != self.mid or topic.direction is not Direction.UP or topic.device is None:
            raise BadTopicError("not an up topic of this MID", topic=message.topic)
        assert isinstance(topic.kind, UpKind)
        if topic.kind not in _KINDS:
            raise BadTopicError("ingest does not take this kind", kind=str(topic.kind))
        model, leaf_kind = _KINDS[topic.kind]
        verdict.device = topic.device
        self._take_token(topic.device)
        verified = self._open(message.payload, model.PAYLOAD_TYPE)
        key_id = verified.key_id
        signer = self._by_key_id[key_id]
        verdict.key_id = key_id
        if signer.device_id != topic.device:
            raise TopicMismatchError(
                "signer does not own this topic", topic_device=topic.device, signer=signer.device_id
            )
        body = decode(verified, model)
        seq = int(getattr(body, "seq"))  # noqa: B009 - every up message carries seq; the models share no base field
        verdict.seq = seq
        self.last_seen_ms[signer.device_id] = now_ms
        if leaf_kind is None:
            # A last will is signed at connect time, so later heartbeats overtake its seq: wills keep their own order.
            assert isinstance(body, Heartbeat)
            last = self._will_seq if body.status is DeviceStatus.OFFLINE else self._heartbeat_seq
            require_newer_seq(last.get(key_id), seq, key_id)
            if self.logged(key_id, seq):
                raise EquivocationError(
                    "a heartbeat under the (key, seq) of a logged statement", key_id=key_id, seq=seq
                )
            last[key_id] = seq
            self.note_status(signer.device_id, body.status, now_ms)
            verdict.outcome = Outcome.HEARTBEAT
        return Screened(signer, key_id, seq, leaf_kind)

    def note_status(self, device_id: str, status: DeviceStatus, now_ms: int) -> None:
        """Remember what a device's heartbeat said (here, or at a screening worker that handed it over)."""
        known = self.statuses.get(device_id)
        if known is None or known[0] is not status:
            self.statuses[device_id] = (status, now_ms)
            self.statuses_changed = True

    def reread(self, message: InboundMessage, verdict: Verdict, now_ms: int) -> Screened:
        """A message a screening worker already screened and verified (its hand-off was authenticated): re-read the
        key id and seq without verifying, and refuse a key revoked since the worker looked."""
        topic = self._parse_topic(message.topic)
        if topic.mid != self.mid or topic.direction is not Direction.UP or topic.device is None:
            raise BadTopicError("not an up topic of this MID", topic=message.topic)
        assert isinstance(topic.kind, UpKind)
        if topic.kind not in _KINDS or _KINDS[topic.kind][1] is None:
            raise BadTopicError("hand-off carries only ledger kinds", kind=str(topic.kind))
        leaf_kind = _KINDS[topic.kind][1]
        verdict.device = topic.device
        _, payload, key_ids = peek_envelope(message.payload)
        signer = next((self._by_key_id[k] for k in key_ids if k in self._by_key_id), None)
        if signer is None:
            raise UnknownKeyError("envelope is not signed by a known key", key_ids=list(key_ids))
        key_id = signer.verifier.key_id.hex()
        verdict.key_id = key_id
        if signer.revoked:
            raise RevokedKeyError("device key was revoked", key_id=key_id, device=signer.device_id)
        if signer.device_id != topic.device:
            raise TopicMismatchError(
                "signer does not own this topic", topic_device=topic.device, signer=signer.device_id
            )
        # u64 fields travel as decimal strings (docs/protocol.md); the worker's strict decode already checked the form.
        raw_seq = json.loads(payload)["seq"]
        if not (isinstance(raw_seq, str) and raw_seq.isascii() and raw_seq.isdigit() and len(raw_seq) <= 20):
            raise MalformedError("seq is not a decimal u64")
        seq = int(raw_seq)
        verdict.seq = seq
        self.last_seen_ms[signer.device_id] = now_ms
        return Screened(signer, key_id, seq, leaf_kind)

    def _parse_topic(self, name: str) -> Topic:
        """`parse_topic`, remembered per topic name: each device sends on the same few topics (measured: parsing was
        about 3 % of a verification per report). Only valid names are kept, and at most TOPIC_CACHE_SIZE of them."""
        topic = self._topics.get(name)
        if topic is None:
            topic = parse_topic(name)
            if len(self._topics) >= TOPIC_CACHE_SIZE:
                self._topics.clear()
            self._topics[name] = topic
        return topic

    def _open(self, payload: bytes, payload_type: str | frozenset[str]) -> VerifiedPayload:
        try:
            return open_envelope(payload, self._keyring, payload_type)
        except UnknownKeyError as exc:
            for kid in exc.details.get("key_ids", []):
                device = self._by_key_id.get(kid)
                if device is not None and device.revoked:
                    raise RevokedKeyError("device key was revoked", key_id=kid, device=device.device_id) from None
            raise

    def _take_token(self, device_id: str) -> None:
        device = self._by_device.get(device_id)
        if device is None:
            return
        rate = device.rate_per_s if device.rate_per_s is not None else self.default_rate
        burst = device.rate_burst if device.rate_burst is not None else self.default_burst
        now = self._clock()
        bucket = self._buckets.get(device_id)
        if bucket is None:
            bucket = self._buckets[device_id] = _Bucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.stamp) * rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            raise RateLimitedError("device exceeded its rate limit", device=device_id, rate_per_s=rate, burst=burst)
        bucket.tokens -= 1.0


def freeze_startup_objects() -> None:
    """Move every object alive now (modules, schemas, the registry: what startup built) out of the garbage
    collector's sight. Call once, when the batch loop starts.

    A batch holds tens of thousands of short-lived objects, enough to set off full collections that walked all
    ~100,000 startup objects each time: measured in `serve` under bench/ingest_bench.py, 2 full collections per 36,000
    reports at about 120 ms each (6-7 us per report, and a 120 ms pause in the receipts' latency); with the startup
    objects frozen, 10 ms each. Startup objects that later become cyclic garbage are never freed, a bounded cost."""
    gc.collect()
    gc.freeze()


def log_rejection(verdict: Verdict) -> None:
    """One WARNING line for a rejected message (docs/protocol.md, "Rejections are counted and logged"); a rate-limited
    one is only counted, so a flood does not flood the log as well. A resend answered with its receipt (DUPLICATE) is
    no rejection to log. `error` is built from the rejection's details, which never hold a secret."""
    if verdict.outcome is Outcome.REJECTED and verdict.reason is not Reason.RATE_LIMITED:
        log.warning(
            "message rejected",
            extra={"reason": str(verdict.reason), "topic": verdict.message.topic[:200], "error": verdict.error},
        )


def screen_one(screener: Screener, message: InboundMessage, verdict: Verdict, now_ms: int) -> Screened | None:
    """`screener.screen` with every failure turned into a settled rejection on `verdict` (None returned)."""
    try:
        return screener.screen(message, verdict, now_ms)
    except _REFUSABLE as exc:
        _refuse(verdict, exc)
    return None


_REFUSABLE = (ProtocolError, ValueError, TypeError, KeyError, UnicodeError, RecursionError)


def _refuse(verdict: Verdict, exc: BaseException) -> None:
    if isinstance(exc, ProtocolError):
        verdict.outcome, verdict.reason, verdict.error = Outcome.REJECTED, exc.reason, str(exc)[:300]
        return
    # A parser bug must not take the service down; the refusal is safe because an honest device resends anything it
    # holds no receipt for.
    log.error("unexpected error screening a message", exc_info=exc, extra={"topic": verdict.message.topic[:200]})
    verdict.outcome, verdict.reason, verdict.error = Outcome.REJECTED, Reason.MALFORMED, repr(exc)[:300]


class IngestPipeline:
    """The sequencer: a Screener plus the dedup index and the ledger for one MID; one thread calls it at a time."""

    def __init__(
        self,
        mid: str,
        registry: Registry,
        ledger: LedgerStore,
        dedup: DedupIndex,
        mid_key: SignerKey,
        max_message_bytes: int,
        default_rate_per_s: float,
        default_burst: int,
        clock: Callable[[], float] = time.monotonic,
        on_departed: Callable[[list[str]], None] = lambda devices: None,
    ) -> None:
        """`on_departed(devices)`: called (on this pipeline's thread) after a logged LeaveNotice revoked `devices`,
        so their broker logins go too (`serve` rewrites the broker's password file)."""
        self.mid = mid
        self.on_departed = on_departed
        self.registry = registry
        self.ledger = ledger
        self.dedup = dedup
        self.mid_key = mid_key
        self.screener = Screener(
            mid,
            registry,
            max_message_bytes,
            default_rate_per_s,
            default_burst,
            clock,
            logged=lambda key_id, seq: dedup.lookup(key_id, seq) is not None,
        )
        self._head: tuple[bytes, int] | None = None
        self._catch_up()
        self.refresh_registry()

    @property
    def last_seen_ms(self) -> dict[str, int]:
        return self.screener.last_seen_ms

    def _catch_up(self) -> None:
        start, size = self.dedup.indexed_size, self.ledger.size
        if start < size:
            # Strike votes first: `commit` records them before the dedup index, so what the index lacks they may too.
            leaves = [(index, decode_leaf(data)) for index, data in self.ledger.leaves(start, size)]
            self._record_strike_votes([(index, leaf.signed) for index, leaf in leaves if leaf.kind is LeafKind.STRIKE])
            self._record_choices([(index, leaf) for index, leaf in leaves if leaf.kind in MEMBER_KINDS])
            added = self.dedup.catch_up(self.ledger.leaves(start, size), size)
            log.info("dedup index caught up with the ledger", extra={"from": start, "to": size, "added": added})

    def _record_strike_votes(self, logged: list[tuple[int, bytes]]) -> None:
        """Keep the (leaf index, envelope) StrikeVotes in the registry, their signers found by key id."""
        if not logged:
            return
        devices = {d.verifier.key_id.hex(): d.device_id for d in self.registry.devices()}
        votes = []
        for index, envelope in logged:
            device = next((devices[k] for k in peek_envelope(envelope)[2] if k in devices), None)
            if device is not None:
                votes.append(logged_strike_vote(index, device, envelope))
        self.registry.record_strike_votes(votes)

    def _record_choices(self, logged: list[tuple[int, Leaf]]) -> None:
        """Keep the (leaf index, leaf) members' choices (leave, knob, consent) in the registry, signers by key id."""
        if not logged:
            return
        devices = {d.verifier.key_id.hex(): d.device_id for d in self.registry.devices()}
        choices = []
        for index, leaf in logged:
            device = next((devices[k] for k in peek_envelope(leaf.signed)[2] if k in devices), None)
            if device is not None:
                choices.append(LoggedChoice(index, leaf.kind, device, leaf.signed))
        self._departed(record_member_choices(self.registry, choices, time.time_ns() // 1_000_000))

    def _departed(self, revoked: list[str]) -> None:
        if revoked:
            self.on_departed(revoked)

    def refresh_registry(self) -> None:
        """Reload device keys when the registry changed, and log any revocation not yet in the ledger: this
        pipeline's thread is where the ledger's writer appends."""
        if not self.screener.refresh_registry():
            return
        logged = log_revocations(self.registry, self.ledger, self.mid_key, self.mid)
        if logged:
            log.info("key revocations logged", extra={"leaf_indices": str(logged)})

    def screen(self, batch: Sequence[InboundMessage], now_ms: int) -> ScreenResult:
        self.refresh_registry()
        result = ScreenResult()
        in_batch: dict[tuple[str, int], Candidate] = {}
        self._head = None
        for message in batch:
            verdict = Verdict(message, Outcome.REJECTED)
            try:
                candidate = self._check(message, verdict, in_batch, now_ms)
            except _REFUSABLE as exc:
                _refuse(verdict, exc)
                result.settled.append(verdict)
                continue
            if candidate is None:
                result.settled.append(verdict)
            else:
                assert verdict.key_id is not None and verdict.seq is not None
                in_batch[(verdict.key_id, verdict.seq)] = candidate
                result.candidates.append(candidate)
        return result

    def _check(
        self, message: InboundMessage, verdict: Verdict, in_batch: dict[tuple[str, int], Candidate], now_ms: int
    ) -> Candidate | None:
        if message.prescreened:
            screened = self.screener.reread(message, verdict, now_ms)
        else:
            screened = self.screener.screen(message, verdict, now_ms)
        if screened.leaf_kind is None:
            return None
        key_id, seq = screened.key_id, screened.seq
        digest = envelope_digest(message.payload)
        seen = self.dedup.lookup(key_id, seq)
        pending = in_batch.get((key_id, seq))
        if seen is not None or pending is not None:
            first_digest = seen.digest if seen is not None else pending.digest  # type: ignore[union-attr]
            if first_digest != digest:
                if seen is not None:
                    self.dedup.record_equivocation(key_id, seq, seen.leaf_index, message.payload, now_ms)
                elif pending is not None:
                    pending.conflicts.append(message.payload)
                raise EquivocationError("different bytes for a (key, seq) already logged", key_id=key_id, seq=seq)
            verdict.outcome, verdict.reason = Outcome.DUPLICATE, Reason.REPLAYED
            if seen is not None:
                # One checkpoint read per screened batch, not per duplicate: a reconnect can redeliver thousands.
                if self._head is None:
                    # Size first, then the checkpoint of exactly that size: serve's other writers (the job-book
                    # follower, the revenue desk) may append between two reads of "the latest".
                    size = self.ledger.size
                    self._head = (self.ledger.checkpoint(size), size)
                verdict.leaf_index, (verdict.checkpoint, size) = seen.leaf_index, self._head
                verdict.path = self.ledger.inclusion_proof(seen.leaf_index, size)
            return None
        return Candidate(verdict, screened.signer, Leaf(screened.leaf_kind, message.payload), digest)

    def commit(self, candidates: Sequence[Candidate], now_ms: int) -> list[Verdict]:
        """Append every candidate in one durable ledger transaction, index them, and build their receipts."""
        if not candidates:
            return []
        leaves = [c.leaf.encode() for c in candidates]
        appended = self.ledger.append(leaves)
        strikes = [
            logged_strike_vote(index, c.device.device_id, c.leaf.signed)
            for c, index in zip(candidates, appended.indices, strict=True)
            if c.leaf.kind is LeafKind.STRIKE
        ]
        if strikes:  # before the dedup index: `_catch_up` finds what a crash in between left out
            self.registry.record_strike_votes(strikes)
        choices = [
            LoggedChoice(index, c.leaf.kind, c.device.device_id, c.leaf.signed)
            for c, index in zip(candidates, appended.indices, strict=True)
            if c.leaf.kind in MEMBER_KINDS
        ]
        if choices:  # likewise before the dedup index
            self._departed(record_member_choices(self.registry, choices, now_ms))
        # Serve's other writers (enrolment, the job-book follower, the revenue desk) may have appended since the index
        # last moved: index their device-signed leaves (enrolment requests) before recording past them.
        if self.dedup.indexed_size < appended.first_index:
            self.dedup.catch_up(self.ledger.leaves(self.dedup.indexed_size, appended.first_index), appended.first_index)
        entries = []
        for candidate, index in zip(candidates, appended.indices, strict=True):
            v = candidate.verdict
            assert v.key_id is not None and v.seq is not None
            entries.append((v.key_id, v.seq, candidate.digest, index))
        self.dedup.record(entries, appended.size)
        proofs = batch_inclusion_proofs(appended.first_index, leaves, self.ledger.inclusion_proof)
        verdicts = []
        for candidate, index, proof in zip(candidates, appended.indices, proofs, strict=True):
            v = candidate.verdict
            v.outcome, v.leaf_index, v.path, v.checkpoint = Outcome.ACCEPTED, index, proof, appended.checkpoint
            for conflicting in candidate.conflicts:
                assert v.key_id is not None and v.seq is not None
                self.dedup.record_equivocation(v.key_id, v.seq, index, conflicting, now_ms)
            verdicts.append(v)
        return verdicts

    def receipt_batches(self, verdicts: Sequence[Verdict], now_ms: int) -> list[tuple[str, bytes]]:
        """One ReceiptBatch per device and checkpoint for the verdicts that owe a receipt: (topic, payload) pairs."""
        groups: dict[tuple[str, bytes], list[tuple[int, int, list[bytes]]]] = {}
        for v in verdicts:
            if v.path is None or v.checkpoint is None:
                continue
            assert v.device is not None and v.seq is not None and v.leaf_index is not None
            groups.setdefault((v.device, v.checkpoint), []).append((v.seq, v.leaf_index, v.path))
        return [
            (down_topic(self.mid, device, DownKind.RECEIPT), receipt_batch_json(checkpoint, chunk, now_ms))
            for (device, checkpoint), entries in groups.items()
            for chunk in _chunks(entries, RECEIPTS_PER_BATCH)
        ]


RECEIPTS_PER_BATCH = 128
"""With inclusion paths of up to 32 hashes (a 4-billion-leaf log) 128 receipts stay near 200 KB, under the broker's
256 KiB max_packet_size and ReceiptBatch's own size limit."""


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


__all__ = [
    "Candidate",
    "InboundMessage",
    "IngestPipeline",
    "Outcome",
    "ReplayedError",
    "ScreenResult",
    "Screened",
    "Screener",
    "Verdict",
    "freeze_startup_objects",
    "screen_one",
]
