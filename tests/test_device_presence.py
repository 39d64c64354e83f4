"""Members tell the MID when they will not come, and the MID keeps it: heartbeat statuses and last-seen times reach
the registry in batches (a status change at the end of its batch, last-seen times at most every few seconds, nothing
on a quiet MID), logged strike votes are kept with their targets (also when a crash fell between the ledger commit
and the registry), screening workers hand statuses over, `absence` says who a job need not wait for and why, and
`coordinator devices` prints it under a header."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ingest_pipeline import NOW_MS, Fixture, topic
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from coordinator.ingest.handoff import VerifiedBatch, open_verified, seal_verified
from coordinator.ingest.pipeline import IngestPipeline
from coordinator.ingest.presence import PresenceRecorder
from coordinator.registry.presence import Presence, StrikeVoteRecord, absence, active_strikes
from coordinator.registry.store import Registry
from protocol.errors import MalformedError
from protocol.identity import SignerKey
from protocol.messages import DeviceStatus, Heartbeat, StrikeVote
from protocol.topics import UpKind

OFFLINE_AFTER_MS = 180_000


class Seconds:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _beat(fx: Fixture, device: str, seq: int, status: DeviceStatus) -> None:
    heartbeat = Heartbeat(seq=seq, device_time_ms=NOW_MS, status=status).seal(fx.keys[device])
    (verdict,) = fx.run(topic(device, UpKind.HEARTBEAT), heartbeat)
    assert verdict.outcome == "heartbeat", verdict.error


def _vote(fx: Fixture, device: str, seq: int, **fields: object) -> int:
    vote = StrikeVote(seq=seq, device_time_ms=NOW_MS, **fields).seal(fx.keys[device])  # type: ignore[arg-type]
    (verdict,) = fx.run(topic(device, UpKind.STRIKE), vote)
    assert verdict.leaf_index is not None, verdict.error
    return verdict.leaf_index


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


def test_a_status_change_is_written_at_once_last_seen_times_in_batches_and_a_quiet_mid_writes_nothing(
    fx: Fixture,
) -> None:
    clock = Seconds()
    recorder = PresenceRecorder(fx.registry, fx.pipeline.screener, every_s=5.0, clock=clock)
    assert not recorder.due() and recorder.write() == 0

    _beat(fx, "dev-a", 1, DeviceStatus.IDLE)
    _beat(fx, "dev-b", 1, DeviceStatus.PAUSED)
    assert recorder.due()  # two statuses heard for the first time
    assert recorder.write() == 2
    heard = fx.registry.presence()
    assert (heard["dev-a"].status, heard["dev-b"].status) == (DeviceStatus.IDLE, DeviceStatus.PAUSED)

    _beat(fx, "dev-a", 2, DeviceStatus.IDLE)  # the same status again: only its last-seen time moved
    fx.pipeline.screener.last_seen_ms["dev-a"] += 1000
    assert not recorder.due()
    clock.now = 5.0
    assert recorder.due() and recorder.write() == 1
    assert fx.registry.presence()["dev-a"].last_seen_ms == NOW_MS + 1000
    clock.now = 10.0
    assert recorder.due() and recorder.write() == 0  # nothing heard since: no transaction

    _beat(fx, "dev-a", 3, DeviceStatus.STRIKING)
    assert recorder.due()


def test_a_last_will_keeps_the_status_and_marks_the_device_offline_until_it_is_heard_again(fx: Fixture) -> None:
    paused = Presence("dev-a", DeviceStatus.PAUSED, NOW_MS, NOW_MS, offline=False)
    fx.registry.record_presence([paused])
    fx.registry.record_presence([Presence("dev-a", DeviceStatus.OFFLINE, NOW_MS + 5, NOW_MS + 5, offline=True)])
    gone = fx.registry.presence()["dev-a"]
    assert (gone.status, gone.status_ms, gone.last_seen_ms, gone.offline) == (
        DeviceStatus.PAUSED,
        NOW_MS,
        NOW_MS + 5,
        True,
    )
    fx.registry.record_presence([Presence("dev-a", DeviceStatus.PAUSED, NOW_MS + 9, NOW_MS + 9, offline=False)])
    back = fx.registry.presence()["dev-a"]
    assert (back.status_ms, back.offline) == (NOW_MS, False)  # paused since the first time it said so
    fx.registry.record_presence([Presence("dev-b", DeviceStatus.OFFLINE, NOW_MS, NOW_MS, offline=True)])
    assert fx.registry.presence()["dev-b"].status is DeviceStatus.OFFLINE  # a will is all the MID ever heard


def test_presence_writes_leave_the_registry_version_alone(fx: Fixture) -> None:
    before = fx.registry.version()
    fx.registry.record_presence([Presence("dev-a", DeviceStatus.IDLE, NOW_MS, NOW_MS, offline=False)])
    fx.registry.record_strike_votes([StrikeVoteRecord(3, "dev-a", "acme", None, NOW_MS, None, False)])
    assert fx.registry.version() == before  # screening does not reload every key for them


def test_logged_strike_votes_are_kept_with_their_targets_and_a_withdrawal_ends_the_strike(fx: Fixture) -> None:
    first = _vote(fx, "dev-a", 1, target_buyer="acme", start_ms=NOW_MS - 10)
    _vote(fx, "dev-b", 1, target_purpose="ads", start_ms=NOW_MS - 10, end_ms=NOW_MS + 100)
    votes = fx.registry.strike_votes()
    assert [(v.leaf_index, v.device_id, v.target_buyer, v.target_purpose, v.withdraw) for v in votes] == [
        (first, "dev-a", "acme", None, False),
        (first + 1, "dev-b", None, "ads", False),
    ]
    active = active_strikes(votes, NOW_MS)
    assert {d: [v.target_text() for v in vs] for d, vs in active.items()} == {
        "dev-a": ["buyer acme"],
        "dev-b": ["purpose ads"],
    }
    assert "dev-b" not in active_strikes(votes, NOW_MS + 100)  # its --until passed

    _vote(fx, "dev-a", 2, target_buyer="acme", start_ms=NOW_MS - 10, end_ms=NOW_MS + 5, withdraw=True)
    votes = fx.registry.strike_votes()
    assert "dev-a" in active_strikes(votes, NOW_MS + 4)
    assert "dev-a" not in active_strikes(votes, NOW_MS + 5)
    assert active_strikes(votes, NOW_MS - 11) == {}  # not started yet


def test_a_strike_vote_a_crash_kept_out_of_the_registry_is_caught_up_from_the_ledger(
    fx: Fixture, tmp_path: Path
) -> None:
    def lost(votes: object) -> None:
        raise OSError("crash between the ledger commit and the registry")

    fx.registry.record_strike_votes = lost  # type: ignore[method-assign]
    with pytest.raises(OSError):
        _vote(fx, "dev-c", 1, target_buyer="acme", start_ms=NOW_MS)
    registry = Registry(tmp_path / "registry.sqlite")
    assert registry.strike_votes() == []
    IngestPipeline("riverside", registry, fx.ledger, fx.dedup, fx.mid_key, 64 * 1024, 10.0, 1000)
    ((kept),) = registry.strike_votes()
    assert (kept.device_id, kept.target_buyer, kept.leaf_index) == ("dev-c", "acme", fx.ledger.size - 1)


def test_a_worker_hands_heartbeat_statuses_over_and_a_bad_status_is_refused() -> None:
    key = b"k" * 32
    batch = VerifiedBatch("w1", 7, [], {"dev-a": NOW_MS}, {"dev-a": DeviceStatus.LEFT})
    topic_name, payload = seal_verified(key, "riverside", batch)
    assert open_verified(key, "riverside", topic_name, payload).statuses == {"dev-a": DeviceStatus.LEFT}
    forged = VerifiedBatch("w1", 8, [], {}, {"dev-a": "asleep"})  # type: ignore[dict-item]
    topic_name, payload = seal_verified(key, "riverside", forged)
    with pytest.raises(MalformedError, match="status summary"):
        open_verified(key, "riverside", topic_name, payload)


def _presence(status: DeviceStatus, seen_ago_ms: int = 0, offline: bool = False) -> Presence:
    return Presence("dev-a", status, NOW_MS - 60_000, NOW_MS - seen_ago_ms, offline)


def _strike(buyer: str | None = None, purpose: str | None = None) -> StrikeVoteRecord:
    return StrikeVoteRecord(1, "dev-a", buyer, purpose, NOW_MS - 1, None, False)


@pytest.mark.parametrize(
    ("presence", "strikes", "why"),
    [
        (_presence(DeviceStatus.IDLE), [], None),
        (_presence(DeviceStatus.TRAINING), [], None),
        (_presence(DeviceStatus.STRIKING), [_strike(buyer="globex")], None),  # against someone else
        (_presence(DeviceStatus.STRIKING), [_strike(buyer="acme")], "striking against buyer acme"),
        (_presence(DeviceStatus.IDLE), [_strike(purpose="research")], "striking against purpose research"),
        (_presence(DeviceStatus.PAUSED), [], "paused"),
        (_presence(DeviceStatus.PAUSED, seen_ago_ms=10**9), [], "paused"),  # the member's word first
        (_presence(DeviceStatus.LEFT), [_strike(buyer="acme")], "left"),
        (_presence(DeviceStatus.IDLE, offline=True), [], "offline: gone without a goodbye"),
        (_presence(DeviceStatus.IDLE, seen_ago_ms=OFFLINE_AFTER_MS + 1), [], "offline: no heartbeat lately"),
        (_presence(DeviceStatus.IDLE, seen_ago_ms=OFFLINE_AFTER_MS), [], None),
        (None, [], "offline: never heard from"),
    ],
)
def test_who_a_job_of_acme_for_research_need_not_wait_for(
    presence: Presence | None, strikes: list[StrikeVoteRecord], why: str | None
) -> None:
    assert absence(presence, strikes, "acme", "research", NOW_MS, OFFLINE_AFTER_MS) == why


def test_coordinator_devices_prints_a_header_and_each_devices_presence(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(f'mid = "riverside"\ndata_dir = "{tmp_path / "data"}"\n')
    runner = CliRunner()
    empty = runner.invoke(coordinator_app, ["devices", "--config", str(config)])
    assert empty.exit_code == 0 and empty.output.startswith("no devices enrolled yet")

    registry = Registry(tmp_path / "data" / "registry.sqlite")
    for device in ("d-paused", "d-striking", "d-left", "d-silent"):
        registry.add_invite(f"inv-{device}", f"m-{device}", NOW_MS, NOW_MS + 10_000)
        registry.redeem_invite(f"inv-{device}", NOW_MS, device, SignerKey.generate(device).verifier, "$7$101$x$y")
    now = _now_ms()
    registry.record_presence(
        [
            Presence("d-paused", DeviceStatus.PAUSED, now - 5000, now - 1000, offline=False),
            Presence("d-striking", DeviceStatus.STRIKING, now - 5000, now - 1000, offline=False),
            Presence("d-left", DeviceStatus.LEFT, now - 5000, now - 1000, offline=True),
        ]
    )
    registry.record_strike_votes([StrikeVoteRecord(9, "d-striking", "acme", None, now - 5000, None, False)])
    registry.revoke("d-silent", now)
    registry.close()

    listed = runner.invoke(coordinator_app, ["devices", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    header, *rows = listed.output.splitlines()
    columns = header.split("\t")
    assert columns[:9] == ["device", "member", "key", "online", "last_seen", "status", "paused", "striking", "left"]
    table = {row.split("\t")[0]: dict(zip(columns, row.split("\t"), strict=True)) for row in rows}
    assert table["d-paused"]["online"] == "yes" and table["d-paused"]["paused"].startswith("since ")
    assert table["d-paused"]["last_seen"].endswith(" s ago)")
    assert table["d-striking"]["striking"] == "buyer acme" and table["d-striking"]["paused"] == "no"
    assert table["d-left"]["left"].startswith("since ") and table["d-left"]["online"] == "no"
    silent = table["d-silent"]
    assert (silent["key"], silent["online"], silent["last_seen"], silent["status"]) == ("revoked", "-", "never", "-")


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000
