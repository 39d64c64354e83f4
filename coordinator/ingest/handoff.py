"""The authenticated hand-off between screening workers and the ledger sequencer (`serve`), over the MID's broker.

A worker publishes what it screened and verified as batches on `mid/{mid}/ingest/verified/{worker}` (QoS 1); the
sequencer commits them and, after the commit, answers `mid/{mid}/ingest/committed/{worker}` with the batch id. Only
then does the worker acknowledge the devices' original messages, so a device message is acknowledged to the broker
only once it is in the ledger, whichever process dies.

Both directions carry an HMAC-SHA256 tag under a key shared by the sequencer and its workers (a 0600 file in the
coordinator's data_dir), because the sequencer skips signature verification for handed-over envelopes: without the
tag, anyone able to publish on the internal topic (a broker misconfiguration, a stolen device login on a broker
without the ACL) could put unverified envelopes into the ledger. The broker ACL restricts the topics as well.

Wire form: 32-byte tag || JSON `{"w": worker, "b": batch id, "e": [[topic, base64 envelope], ...]}` (verified; with
`"s": {device: ms}` and `"st": {device: status}` when it carries the worker's heartbeat summary), or
tag || JSON `{"w": worker, "b": batch id}` (committed). The tag covers a domain string, the topic and the body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import BadSignatureError, MalformedError, TooLargeError
from protocol.messages import DeviceStatus
from protocol.topics import check_id

TAG_BYTES = 32
MAX_HANDOFF_BYTES = 1024 * 1024
"""Refused before parsing; workers split their batches well under the broker's 256 KiB packet limit."""
HANDOFF_TARGET_BYTES = 192 * 1024
_DOMAIN = b"midgate-ingest-handoff-v1\n"
_DEVICE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # protocol.topics.check_id's pattern
_STATUSES = frozenset(str(status) for status in DeviceStatus)


def verified_topic(mid: str, worker: str) -> str:
    return f"mid/{check_id(mid, 'mid')}/ingest/verified/{check_id(worker, 'worker')}"


def committed_topic(mid: str, worker: str) -> str:
    return f"mid/{check_id(mid, 'mid')}/ingest/committed/{check_id(worker, 'worker')}"


def sequencer_filters(mid: str) -> tuple[str, ...]:
    return (f"mid/{check_id(mid, 'mid')}/ingest/verified/+",)


def worker_filters(mid: str, group: str) -> tuple[str, ...]:
    """The MQTT 5 shared subscription to every device's up topics. Hand-offs and commit notices (`committed_topic`)
    use a second connection: on this one the device messages awaiting their commit fill the in-flight window."""
    return (f"$share/{check_id(group, 'group')}/mid/{check_id(mid, 'mid')}/dev/+/up/+",)


def is_handoff_topic(mid: str, topic: str) -> bool:
    return topic.startswith(f"mid/{mid}/ingest/verified/")


def load_or_create_handoff_key(path: Path) -> bytes:
    """32 random bytes in a 0600 file; whichever process starts first creates it, the others read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != 32:
            raise MalformedError("hand-off key file must hold 32 bytes", path=str(path)) from None
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


def _tag(key: bytes, topic: str, body: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + topic.encode() + b"\n" + body, hashlib.sha256).digest()


@dataclass(frozen=True)
class VerifiedBatch:
    worker: str
    batch_id: int
    entries: list[tuple[str, bytes]]
    """(device topic, envelope bytes) as the worker received and verified them."""
    seen: dict[str, int] = field(default_factory=dict)
    """device id -> ms when the worker last verified a heartbeat from it: heartbeats are settled by the worker and
    never handed over, yet the sequencer's devices-online gauge must count those devices."""
    statuses: dict[str, DeviceStatus] = field(default_factory=dict)
    """device id -> the status its latest heartbeat said, for the sequencer's record of presence
    (coordinator/ingest/presence.py)."""


def seal_verified(key: bytes, mid: str, batch: VerifiedBatch) -> tuple[str, bytes]:
    topic = verified_topic(mid, batch.worker)
    body = json.dumps(
        {
            "w": batch.worker,
            "b": batch.batch_id,
            "e": [[t, base64.b64encode(env).decode("ascii")] for t, env in batch.entries],
            **({"s": batch.seen} if batch.seen else {}),
            **({"st": {d: str(status) for d, status in batch.statuses.items()}} if batch.statuses else {}),
        },
        separators=(",", ":"),
    ).encode()
    return topic, _tag(key, topic, body) + body


def seal_committed(key: bytes, mid: str, worker: str, batch_id: int) -> tuple[str, bytes]:
    topic = committed_topic(mid, worker)
    body = json.dumps({"w": worker, "b": batch_id}, separators=(",", ":")).encode()
    return topic, _tag(key, topic, body) + body


def _open(key: bytes, topic: str, payload: bytes) -> dict[str, object]:
    if len(payload) > MAX_HANDOFF_BYTES:
        raise TooLargeError("hand-off message too large", limit=MAX_HANDOFF_BYTES, found=len(payload))
    if len(payload) <= TAG_BYTES:
        raise MalformedError("hand-off message shorter than its tag")
    tag, body = payload[:TAG_BYTES], payload[TAG_BYTES:]
    if not hmac.compare_digest(tag, _tag(key, topic, body)):
        raise BadSignatureError("hand-off tag does not verify", topic=topic[:200])
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeError) as exc:
        raise MalformedError("hand-off body is not JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("w"), str) or type(doc.get("b")) is not int:
        raise MalformedError("hand-off body lacks worker or batch id")
    return doc


def open_verified(key: bytes, mid: str, topic: str, payload: bytes) -> VerifiedBatch:
    """Tag first, then shape; the worker named inside must be the one the topic names."""
    doc = _open(key, topic, payload)
    worker = str(doc["w"])
    if topic != verified_topic(mid, worker):
        raise MalformedError("hand-off worker does not match its topic", topic=topic[:200])
    raw = doc.get("e")
    if not isinstance(raw, list):
        raise MalformedError("hand-off entries missing")
    entries: list[tuple[str, bytes]] = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise MalformedError("hand-off entry is not [topic, envelope]")
        try:
            entries.append((item[0], base64.b64decode(item[1], validate=True)))
        except ValueError as exc:
            raise MalformedError("hand-off envelope is not base64") from exc
    seen = doc.get("s", {})
    if not isinstance(seen, dict) or not all(
        isinstance(d, str) and _DEVICE_ID.fullmatch(d) and type(ms) is int and 0 <= ms < 2**63 for d, ms in seen.items()
    ):
        raise MalformedError("hand-off heartbeat summary is not {device id: ms}")
    statuses = doc.get("st", {})
    if not isinstance(statuses, dict) or not all(
        isinstance(d, str) and _DEVICE_ID.fullmatch(d) and status in _STATUSES for d, status in statuses.items()
    ):
        raise MalformedError("hand-off status summary is not {device id: heartbeat status}")
    batch_id = doc["b"]
    assert isinstance(batch_id, int)
    return VerifiedBatch(worker, batch_id, entries, seen, {d: DeviceStatus(s) for d, s in statuses.items()})


def open_committed(key: bytes, mid: str, worker: str, topic: str, payload: bytes) -> int:
    doc = _open(key, topic, payload)
    if topic != committed_topic(mid, worker) or doc["w"] != worker:
        raise MalformedError("commit notice is not for this worker", topic=topic[:200])
    batch_id = doc["b"]
    assert isinstance(batch_id, int)
    return batch_id


__all__ = [
    "HANDOFF_TARGET_BYTES",
    "VerifiedBatch",
    "committed_topic",
    "is_handoff_topic",
    "load_or_create_handoff_key",
    "open_committed",
    "open_verified",
    "seal_committed",
    "seal_verified",
    "sequencer_filters",
    "verified_topic",
    "worker_filters",
]
