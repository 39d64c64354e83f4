"""Topic builders, the strict parser and subscription filters; no id can inject a level or a wildcard."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import BadTopicError, Reason
from protocol.topics import (
    MESSAGE_BY_DOWN_KIND,
    MESSAGE_BY_UP_KIND,
    BroadcastKind,
    Direction,
    DownKind,
    Topic,
    UpKind,
    broadcast_topic,
    check_id,
    checkpoint_topic,
    coordinator_filters,
    device_filters,
    down_topic,
    parse_topic,
    up_topic,
)


def test_builders_follow_the_design_scheme() -> None:
    assert up_topic("mid-a", "dev-1", UpKind.REPORT) == "mid/mid-a/dev/dev-1/up/report"
    assert down_topic("mid-a", "dev-1", DownKind.RECEIPT) == "mid/mid-a/dev/dev-1/down/receipt"
    assert checkpoint_topic("mid-a") == "mid/mid-a/ledger/checkpoint"
    assert broadcast_topic("mid-a", BroadcastKind.POLICY) == "mid/mid-a/broadcast/policy"


def test_filters() -> None:
    assert coordinator_filters("mid-a") == ("mid/mid-a/dev/+/up/+",)
    assert device_filters("mid-a", "dev-1") == (
        "mid/mid-a/dev/dev-1/down/+",
        "mid/mid-a/broadcast/+",
        "mid/mid-a/ledger/checkpoint",
    )


ALL_TOPICS = (
    [up_topic("m", "d", k) for k in UpKind]
    + [down_topic("m", "d", k) for k in DownKind]
    + [broadcast_topic("m", k) for k in BroadcastKind]
    + [checkpoint_topic("m")]
)


@pytest.mark.parametrize("topic", ALL_TOPICS)
def test_parse_inverts_every_builder(topic: str) -> None:
    parsed = parse_topic(topic)
    assert str(parsed) == topic
    assert parsed.mid == "m"


def test_parse_names_the_parts() -> None:
    assert parse_topic("mid/mid-a/dev/0a1b/up/heartbeat") == Topic("mid-a", Direction.UP, "0a1b", UpKind.HEARTBEAT)
    assert parse_topic("mid/x/ledger/checkpoint") == Topic("x", Direction.CHECKPOINT, None, None)


def test_every_kind_maps_to_a_message() -> None:
    assert set(MESSAGE_BY_UP_KIND) == set(UpKind)
    assert set(MESSAGE_BY_DOWN_KIND) == set(DownKind)
    payload_types = [model.PAYLOAD_TYPE for models in MESSAGE_BY_UP_KIND.values() for model in models]
    assert len(payload_types) == len(set(payload_types))  # a payloadType names one message on one kind


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "mid",
        "mid/a",
        "mid/a/dev/d/up",
        "mid/a/dev/d/up/report/extra",
        "mid/a/dev/d/sideways/report",
        "mid/a/dev/d/up/unknown",
        "mid/a/dev/d/down/report",
        "mid/a/broadcast/report",
        "mid/a/ledger/other",
        "mid/a/dev/+/up/report",
        "mid/a/dev/#",
        "mid/+/dev/d/up/report",
        "mid/A/dev/d/up/report",
        "mid/a/dev/d\x00/up/report",
        "mid/a/dev//up/report",
        "/mid/a/dev/d/up/report",
        "mid/a/dev/d/up/report/",
        "$SYS/mid/a/ledger/checkpoint",
        "Mid/a/ledger/checkpoint",
        "mid/-a/ledger/checkpoint",
        "mid/" + "a" * 64 + "/ledger/checkpoint",
        "mid/a/dev/" + "d" * 300 + "/up/report",
    ],
)
def test_parse_rejects_everything_outside_the_grammar(topic: str) -> None:
    with pytest.raises(BadTopicError) as info:
        parse_topic(topic)
    assert info.value.reason is Reason.BAD_TOPIC


@pytest.mark.parametrize("bad", ["", "A", "a/b", "+", "#", "a+", "a#", "-a", "a b", "a_b", "é", "a" * 64, "$sys"])
def test_builders_refuse_unsafe_ids(bad: str) -> None:
    with pytest.raises(BadTopicError):
        up_topic("mid-a", bad, UpKind.REPORT)
    with pytest.raises(BadTopicError):
        checkpoint_topic(bad)


def test_builders_refuse_unknown_kinds() -> None:
    with pytest.raises(BadTopicError):
        up_topic("m", "d", "receipt")  # type: ignore[arg-type]


ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")


@settings(max_examples=300, deadline=None)
@given(mid=ids, device=ids, kind=st.sampled_from(list(UpKind)))
def test_property_valid_ids_round_trip(mid: str, device: str, kind: UpKind) -> None:
    assert parse_topic(up_topic(mid, device, kind)) == Topic(mid, Direction.UP, device, kind)
    assert check_id(mid) == mid


@settings(max_examples=500, deadline=None)
@given(
    prefix=st.text(max_size=8),
    bad=st.sampled_from(["+", "#", "/", "$", "A", " ", "\x00", "\n", "_", ".", "é", "\u202e"]),
    suffix=st.text(max_size=8),
    where=st.sampled_from(["mid", "device"]),
)
def test_property_injected_characters_never_parse_or_build(prefix: str, bad: str, suffix: str, where: str) -> None:
    evil = prefix + bad + suffix
    mid, device = (evil, "d") if where == "mid" else ("m", evil)
    with pytest.raises(BadTopicError):
        up_topic(mid, device, UpKind.REPORT)
    with pytest.raises(BadTopicError):
        parse_topic(f"mid/{mid}/dev/{device}/up/report")


@settings(max_examples=500, deadline=None)
@given(topic=st.text(max_size=300))
def test_property_parse_accepts_only_what_the_builders_produce(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except BadTopicError:
        return
    assert str(parsed) == topic
