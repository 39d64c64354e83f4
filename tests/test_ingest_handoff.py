"""The worker -> sequencer hand-off format: authenticated both ways, bounded, and refused precisely when wrong."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from test_ingest_pipeline import NOW_MS, Fixture, topic

from coordinator.ingest.handoff import (
    MAX_HANDOFF_BYTES,
    VerifiedBatch,
    load_or_create_handoff_key,
    open_committed,
    open_verified,
    seal_committed,
    seal_verified,
    worker_filters,
)
from coordinator.ingest.pipeline import InboundMessage, Outcome, Verdict
from protocol.errors import ProtocolError, Reason
from protocol.identity import SignerKey
from protocol.leaves import LeafKind, decode_leaf
from protocol.topics import UpKind

KEY = bytes(range(32))
ENTRIES = [("mid/m/dev/d1/up/report", b'{"payloadType":"x"}'), ("mid/m/dev/d2/up/strike", b"\x00\xff")]


def test_verified_batch_round_trips_exactly() -> None:
    topic, payload = seal_verified(KEY, "m", VerifiedBatch("w1", 7, ENTRIES))
    assert topic == "mid/m/ingest/verified/w1"
    assert open_verified(KEY, "m", topic, payload) == VerifiedBatch("w1", 7, ENTRIES)


def _reason(call: object) -> Reason:
    with pytest.raises(ProtocolError) as info:
        call()  # type: ignore[operator]
    return info.value.reason


def test_wrong_key_flipped_byte_or_other_topic_is_bad_signature() -> None:
    topic, payload = seal_verified(KEY, "m", VerifiedBatch("w1", 7, ENTRIES))
    assert _reason(lambda: open_verified(b"\x01" * 32, "m", topic, payload)) is Reason.BAD_SIGNATURE
    flipped = payload[:-3] + bytes([payload[-3] ^ 1]) + payload[-2:]
    assert _reason(lambda: open_verified(KEY, "m", topic, flipped)) is Reason.BAD_SIGNATURE
    # The tag covers the topic: a batch replayed onto another worker's topic does not verify.
    assert _reason(lambda: open_verified(KEY, "m", "mid/m/ingest/verified/w2", payload)) is Reason.BAD_SIGNATURE


def test_oversized_and_short_hand_offs_are_refused_before_parsing() -> None:
    assert _reason(lambda: open_verified(KEY, "m", "t", b"x" * (MAX_HANDOFF_BYTES + 1))) is Reason.TOO_LARGE
    assert _reason(lambda: open_verified(KEY, "m", "t", b"x" * 32)) is Reason.MALFORMED


def test_commit_notice_is_bound_to_its_worker() -> None:
    topic, payload = seal_committed(KEY, "m", "w1", 99)
    assert open_committed(KEY, "m", "w1", topic, payload) == 99
    assert _reason(lambda: open_committed(KEY, "m", "w2", topic, payload)) is Reason.MALFORMED
    assert _reason(lambda: open_committed(b"\x02" * 32, "m", "w1", topic, payload)) is Reason.BAD_SIGNATURE


def test_worker_subscribes_with_an_mqtt5_shared_subscription() -> None:
    assert worker_filters("m", "ingest") == ("$share/ingest/mid/m/dev/+/up/+",)


def test_key_file_is_private_and_shared_by_every_process(tmp_path: Path) -> None:
    path = tmp_path / "d" / "ingest-handoff.key"
    first = load_or_create_handoff_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_handoff_key(path) == first and len(first) == 32
    path.write_bytes(b"short")
    assert _reason(lambda: load_or_create_handoff_key(path)) is Reason.MALFORMED


# --- the sequencer's side: what a worker handed over is re-read, not re-verified, but still checked -------------


def _prescreened(fx: Fixture, topic_: str, payload: bytes) -> list[Verdict]:
    screened = fx.pipeline.screen([InboundMessage(topic_, payload, prescreened=True)], NOW_MS)
    return screened.settled + fx.pipeline.commit(screened.candidates, NOW_MS)


def test_sequencer_logs_a_handed_over_report_once_and_answers_its_resend(tmp_path: Path) -> None:
    fx = Fixture(tmp_path)
    envelope = fx.report("dev-a", 1)
    (first,) = _prescreened(fx, topic("dev-a"), envelope)
    assert first.outcome is Outcome.ACCEPTED and first.seq == 1
    (again,) = _prescreened(fx, topic("dev-a"), envelope)
    assert again.outcome is Outcome.DUPLICATE and again.leaf_index == first.leaf_index
    assert fx.ledger.size == 1


def test_sequencer_refuses_handed_over_reports_from_revoked_keys_or_other_topics(tmp_path: Path) -> None:
    fx = Fixture(tmp_path)
    (mismatch,) = _prescreened(fx, topic("dev-b"), fx.report("dev-a", 1))
    assert mismatch.reason is Reason.TOPIC_MISMATCH
    (heartbeat,) = _prescreened(fx, topic("dev-a", UpKind.HEARTBEAT), fx.report("dev-a", 2))
    assert heartbeat.reason is Reason.BAD_TOPIC
    stranger = SignerKey.generate("stranger")
    (unknown,) = _prescreened(fx, topic("dev-a"), fx.report("dev-a", 3, key=stranger))
    assert unknown.reason is Reason.UNKNOWN_KEY
    # Revoked after a worker verified it: the sequencer still refuses it.
    fx.registry.revoke("dev-c", NOW_MS)
    (revoked,) = _prescreened(fx, topic("dev-c"), fx.report("dev-c", 1))
    assert revoked.reason is Reason.REVOKED_KEY
    kinds = [decode_leaf(data).kind for _, data in fx.ledger.leaves(0, fx.ledger.size)]
    assert LeafKind.CONTRIBUTION not in kinds  # only the key-revoke leaf was appended
