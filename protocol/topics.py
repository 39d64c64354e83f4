"""MQTT topic names: builders, a strict parser and the subscription filters of each side.

    mid/{mid}/dev/{device}/up/{kind}      device -> coordinator
    mid/{mid}/dev/{device}/down/{kind}    coordinator -> one device
    mid/{mid}/ledger/checkpoint           coordinator -> everyone (retained)
    mid/{mid}/broadcast/{kind}            coordinator -> everyone

Ids are 1..63 characters of [a-z0-9-], starting with a letter or digit, so no id can smuggle a level separator
('/'), a wildcard ('+', '#'), a '$' system prefix or a character a broker ACL pattern treats specially. Kinds come
from closed enums. Broker ACLs use the same shapes (a device writes only its own `up` topics); they never replace
the signature check on the payload.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from protocol.errors import BadTopicError
from protocol.messages import (
    CheckpointAnnouncement,
    ConsentPolicy,
    ContributionReport,
    EnrolmentRequest,
    EnrolmentResponse,
    Heartbeat,
    KnobUpdate,
    LeaveNotice,
    ReceiptBatch,
    Refusal,
    RoundInvitation,
    Statement,
    StrikeVote,
    WireMessage,
)

MAX_ID_LEN = 63
MAX_TOPIC_LEN = 256
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
K = TypeVar("K", bound=StrEnum)


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    CHECKPOINT = "checkpoint"
    BROADCAST = "broadcast"


class UpKind(StrEnum):
    """What a device publishes."""

    ENROL = "enrol"
    REPORT = "report"
    HEARTBEAT = "heartbeat"
    KNOB = "knob"
    CONSENT = "consent"
    STRIKE = "strike"
    LEAVE = "leave"


class DownKind(StrEnum):
    """What the coordinator sends to one device."""

    ENROLLED = "enrolled"
    RECEIPT = "receipt"
    INVITE = "invite"
    STATEMENT = "statement"
    REFUSAL = "refusal"


class BroadcastKind(StrEnum):
    """What the coordinator sends to every device of the MID."""

    POLICY = "policy"
    STRIKE = "strike"


MESSAGE_BY_UP_KIND: dict[UpKind, tuple[type[WireMessage], ...]] = {
    UpKind.ENROL: (EnrolmentRequest,),
    UpKind.REPORT: (ContributionReport,),
    UpKind.HEARTBEAT: (Heartbeat,),
    UpKind.KNOB: (KnobUpdate,),
    UpKind.CONSENT: (ConsentPolicy,),
    UpKind.STRIKE: (StrikeVote,),
    UpKind.LEAVE: (LeaveNotice,),
}
"""The messages each up topic kind carries; the envelope's payloadType says which one."""
MESSAGE_BY_DOWN_KIND: dict[DownKind, type[WireMessage]] = {
    DownKind.ENROLLED: EnrolmentResponse,
    DownKind.RECEIPT: ReceiptBatch,
    DownKind.INVITE: RoundInvitation,
    DownKind.STATEMENT: Statement,
    DownKind.REFUSAL: Refusal,
}
CHECKPOINT_MESSAGE: type[WireMessage] = CheckpointAnnouncement
"""The retained message on mid/{mid}/ledger/checkpoint."""


def check_id(value: str, what: str = "id") -> str:
    """Requires `value` to be 1..63 characters of [a-z0-9-] not starting with '-'; returns it."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise BadTopicError(
            f"{what} must be 1..{MAX_ID_LEN} characters of [a-z0-9-], not starting with '-'", found=value
        )
    return value


@dataclass(frozen=True)
class Topic:
    """A parsed topic. `device` is set for up/down topics; `kind` is None only for the checkpoint topic."""

    mid: str
    direction: Direction
    device: str | None
    kind: UpKind | DownKind | BroadcastKind | None

    def __str__(self) -> str:
        if self.direction is Direction.CHECKPOINT:
            return checkpoint_topic(self.mid)
        if self.direction is Direction.BROADCAST:
            assert isinstance(self.kind, BroadcastKind)
            return broadcast_topic(self.mid, self.kind)
        assert self.device is not None
        if self.direction is Direction.UP:
            assert isinstance(self.kind, UpKind)
            return up_topic(self.mid, self.device, self.kind)
        assert isinstance(self.kind, DownKind)
        return down_topic(self.mid, self.device, self.kind)


def up_topic(mid: str, device: str, kind: UpKind) -> str:
    return f"mid/{check_id(mid, 'mid')}/dev/{check_id(device, 'device')}/up/{_kind(UpKind, kind)}"


def down_topic(mid: str, device: str, kind: DownKind) -> str:
    return f"mid/{check_id(mid, 'mid')}/dev/{check_id(device, 'device')}/down/{_kind(DownKind, kind)}"


def checkpoint_topic(mid: str) -> str:
    return f"mid/{check_id(mid, 'mid')}/ledger/checkpoint"


def broadcast_topic(mid: str, kind: BroadcastKind) -> str:
    return f"mid/{check_id(mid, 'mid')}/broadcast/{_kind(BroadcastKind, kind)}"


def _kind(enum: type[K], value: str) -> K:
    try:
        return enum(value)
    except ValueError:
        raise BadTopicError(f"unknown {enum.__name__}", found=value) from None


def coordinator_filters(mid: str) -> tuple[str, ...]:
    """What the coordinator's ingest subscribes to: every device's up topics."""
    return (f"mid/{check_id(mid, 'mid')}/dev/+/up/+",)


def device_filters(mid: str, device: str) -> tuple[str, ...]:
    """What a device subscribes to: its own down topics, the broadcasts and the retained checkpoint."""
    mid = check_id(mid, "mid")
    return (
        f"mid/{mid}/dev/{check_id(device, 'device')}/down/+",
        f"mid/{mid}/broadcast/+",
        f"mid/{mid}/ledger/checkpoint",
    )


def parse_topic(topic: str) -> Topic:
    """Parse a concrete topic name (no wildcards) into its parts; anything outside the grammar is `bad_topic`."""
    if not isinstance(topic, str) or not 0 < len(topic) <= MAX_TOPIC_LEN:
        raise BadTopicError("topic must be a string of 1..256 characters")
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != "mid":
        raise BadTopicError("topic must start with mid/{mid}/", topic=topic)
    mid = check_id(levels[1], "mid")
    rest = levels[2:]
    try:
        if rest == ["ledger", "checkpoint"]:
            return Topic(mid, Direction.CHECKPOINT, None, None)
        if len(rest) == 2 and rest[0] == "broadcast":
            return Topic(mid, Direction.BROADCAST, None, BroadcastKind(rest[1]))
        if len(rest) == 4 and rest[0] == "dev":
            device = check_id(rest[1], "device")
            if rest[2] == "up":
                return Topic(mid, Direction.UP, device, UpKind(rest[3]))
            if rest[2] == "down":
                return Topic(mid, Direction.DOWN, device, DownKind(rest[3]))
    except ValueError:
        raise BadTopicError("unknown message kind in topic", topic=topic) from None
    raise BadTopicError("topic is not one of the midgate topic shapes", topic=topic)


__all__ = [
    "CHECKPOINT_MESSAGE",
    "MAX_ID_LEN",
    "MAX_TOPIC_LEN",
    "MESSAGE_BY_DOWN_KIND",
    "MESSAGE_BY_UP_KIND",
    "BroadcastKind",
    "Direction",
    "DownKind",
    "Topic",
    "UpKind",
    "broadcast_topic",
    "check_id",
    "checkpoint_topic",
    "coordinator_filters",
    "device_filters",
    "down_topic",
    "parse_topic",
    "up_topic",
]
