"""A strike at the MID's quorum: `serve` logs it coming into force and ending as STRIKE_QUORUM leaves whose counted
votes an auditor can check against the log, and a job of the target already running finishes or is stopped as the
policy's `[strikes] running_jobs` says. Real SQLite ledger and registry, real Ed25519; the SuperLink is a fake."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from job_requests import job_request
from test_job_start_waiting import FakeRun, _job_run

from coordinator.federation.job import JobOutcome
from coordinator.federation.job_start import COMPLETED, JobRecord
from coordinator.ledger.store import LedgerReader, LedgerStore
from coordinator.policy.document import StrikePolicy, parse_policy
from coordinator.policy.strike_quorum import StrikePolicyInForce, StrikeQuorumLog, logged_strikes, strikes_in_force
from coordinator.registry.presence import Presence, StrikeVoteRecord
from coordinator.registry.store import Registry
from coordinator.registry.strikes import StrikeTarget
from protocol.errors import MalformedError
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind, decode_leaf
from protocol.messages import DeviceStatus, StrikeVote
from protocol.strike_quorum import StrikeQuorumRecord, check_counted_votes, decode_strike_quorum


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _members(path: Path, devices: list[str]) -> tuple[Registry, dict[str, SignerKey]]:
    registry = Registry(path)
    now = _now_ms()
    keys = {}
    for node, device in enumerate(devices, start=11):
        keys[device] = SignerKey.generate(device)
        registry.add_invite(f"inv-{device}", f"m-{device}", now, now + 10_000)
        registry.redeem_invite(f"inv-{device}", now, device, keys[device].verifier, "$7$101$x$y")
        registry.add_flower_node(device, node, f"ecdsa-sha2-nistp256 {device}", now)
    registry.record_presence([Presence(d, DeviceStatus.IDLE, now - 1000, now, offline=False) for d in devices])
    return registry, keys


def _vote(ledger: LedgerStore, registry: Registry, key: SignerKey, device: str, seq: int, **kw: object) -> int:
    """Log a signed StrikeVote against buyer acme as ingest does: the leaf, then the registry's record of it."""
    fields: dict[str, object] = {"target_buyer": "acme", "start_ms": _now_ms() - 1000} | kw
    vote = StrikeVote(seq=seq, device_time_ms=_now_ms(), **fields)  # type: ignore[arg-type]
    index = ledger.append_leaves([Leaf(LeafKind.STRIKE, vote.seal(key))]).first_index
    registry.record_strike_votes(
        [
            StrikeVoteRecord(
                index, device, vote.target_buyer, vote.target_purpose, vote.start_ms, vote.end_ms, vote.withdraw
            )
        ]
    )
    return index


def _strike_leaves(ledger: LedgerStore) -> list[StrikeQuorumRecord]:
    found = []
    for _, data in ledger.leaves(0, ledger.size):
        leaf = decode_leaf(data)
        if leaf.kind is LeafKind.STRIKE_QUORUM:
            found.append(decode_strike_quorum(leaf.signed))
    return found


def test_a_strike_reaching_and_leaving_its_quorum_is_logged_once_each_way_and_its_counted_votes_check(
    tmp_path: Path,
) -> None:
    ledger = LedgerStore.open(tmp_path / "ledger.sqlite", SignerKey.generate("midgate/riverside"))
    registry, keys = _members(tmp_path / "registry.sqlite", ["d-ann", "d-bob", "d-cid", "d-dan"])
    policy = StrikePolicyInForce(StrikePolicy(quorum_bps=5000, min_members=2, running_jobs="stop"), 3)
    try:
        follower = StrikeQuorumLog(ledger, registry, lambda: policy)
        first = _vote(ledger, registry, keys["d-ann"], "d-ann", 1)
        assert follower.sync() == []  # 1 of 4, quorum 2: nothing to log
        second = _vote(ledger, registry, keys["d-bob"], "d-bob", 1, target_purpose="ads")  # acme for ads only
        # acme for ads: ann's vote against acme covers it too, 2 of 4 (quorum 2); acme for every purpose: 1 of 4.
        assert len(follower.sync()) == 1 and follower.in_force == {StrikeTarget("acme", "ads")}
        third = _vote(ledger, registry, keys["d-cid"], "d-cid", 1)
        (reached,) = follower.sync()
        assert follower.sync() == []  # logged once
        for_ads, record = _strike_leaves(ledger)
        assert (for_ads.target_purpose, for_ads.counted_votes) == ("ads", (first, second))
        assert (record.target_buyer, record.target_purpose, record.in_force) == ("acme", None, True)
        assert (record.strikers, record.needed, record.active_members) == (2, 2, 4)
        assert (record.policy_version, record.running_jobs, record.counted_votes) == (3, "stop", (first, third))
        leaves = dict(ledger.leaves(0, ledger.size))
        check_counted_votes(record, leaves)
        check_counted_votes(for_ads, leaves)
        assert follower.in_force == {StrikeTarget("acme", None), StrikeTarget("acme", "ads")}
        # A restart reads the state back from the log: nothing is logged again.
        assert StrikeQuorumLog(ledger, registry, lambda: policy).sync() == []

        # cid withdraws: 1 of 4 strikes against acme, the strike ends by the same rule, logged once (acme for ads
        # stays in force: ann and bob).
        registry.record_strike_votes(
            [StrikeVoteRecord(third + 100, "d-cid", "acme", None, _vote_start(registry, third), _now_ms(), True)]
        )
        (ended_at,) = follower.sync()
        assert follower.sync() == [] and ended_at > reached
        ended = _strike_leaves(ledger)[-1]
        assert (ended.in_force, ended.strikers, ended.counted_votes) == (False, 1, (first,))
        with LedgerReader.open_existing(tmp_path / "ledger.sqlite") as reader:
            assert [r.target_purpose for _, r in strikes_in_force(reader)] == ["ads"]
            assert logged_strikes(reader)[StrikeTarget("acme", None)][0] == ended_at

        # A record that counts a leaf that is not a vote against its target fails the check, naming the leaf.
        forged = record.model_copy(update={"counted_votes": (first, second)})
        with pytest.raises(MalformedError) as caught:
            check_counted_votes(forged, leaves)
        assert caught.value.details["leaf_index"] == second
        with pytest.raises(MalformedError):  # strikers under the quorum cannot say in force
            decode_strike_quorum(record.canonical_json().replace(b'"strikers":2', b'"strikers":1'))
    finally:
        registry.close()
        ledger.close()


def _vote_start(registry: Registry, index: int) -> int:
    return next(v.start_ms for v in registry.strike_votes() if v.leaf_index == index)


class StruckMidRun(FakeRun):
    """A run still going when a strike against its buyer reaches the quorum (at the first status look); it ends
    completed at the next look unless it was stopped."""

    def __init__(self, jobs_dir: Path, registry: Registry) -> None:
        super().__init__(jobs_dir, came=[])
        self.registry = registry
        self.looks = 0
        self.stopped: list[int] = []

    def submit_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        self.submitted.append(run_config)
        return self.RUN_ID

    def run_status(self, run_id: int) -> str:
        self.looks += 1
        if self.looks == 1:
            now = _now_ms()
            self.registry.record_strike_votes([StrikeVoteRecord(9, "d-ann", "acme", None, now - 1000, None, False)])
            return "running"
        outcome = JobOutcome(run_id=run_id, status="finished", rounds_completed=0, final_model_sha256="ab" * 32)
        (self.jobs_dir / f"run-{run_id}").mkdir(parents=True, exist_ok=True)
        outcome.write(self.jobs_dir / f"run-{run_id}")
        return COMPLETED

    def stop_run(self, run_id: int) -> None:
        self.stopped.append(run_id)


def _run_struck(
    tmp_path: Path, registry: Registry, control: type[StruckMidRun], running_jobs: str
) -> tuple[JobRecord, list[str], list[int]]:
    """A one-round job on `control`'s run under a strike quorum of half the members, with the policy's running_jobs:
    its record, the lines it said, the runs it stopped."""
    run, lines = _job_run(tmp_path, registry, job_request(tmp_path, rounds=1), came=[])
    run.control = struck = control(tmp_path / "jobs", registry)
    run.status_every_s = 0.0
    run.strike_quorum_bps, run.strike_min_members = 5000, 1
    run.strike_stops_running = running_jobs == "stop"
    return run.run(), lines, struck.stopped


@pytest.mark.parametrize("running_jobs", ["finish", "stop"])
def test_a_running_job_finishes_or_is_stopped_with_reason_strike_as_the_policy_says(
    tmp_path: Path, running_jobs: str
) -> None:
    registry, _ = _members(tmp_path / "registry.sqlite", ["d-ann", "d-bob"])
    try:
        record, lines, stopped = _run_struck(tmp_path, registry, StruckMidRun, running_jobs)
        if running_jobs == "stop":
            assert (record.status, record.reason, stopped) == ("failed", "strike", [FakeRun.RUN_ID])
            assert f"run {FakeRun.RUN_ID} stopped: 1 of 2 members strike against buyer acme (quorum 1)" in lines
        else:
            assert stopped == [] and record.reason != "strike"
    finally:
        registry.close()


def test_the_policy_file_says_what_a_strike_does_to_running_jobs() -> None:
    base = b"fee_bps = 1000\n[knob]\nbase_price_minor = 1000\nmin_price_minor = 100\nmax_price_minor = 10000\n"
    assert parse_policy(base).strikes.running_jobs == "finish"
    assert parse_policy(base + b'[strikes]\nrunning_jobs = "stop"\n').strikes.running_jobs == "stop"
    with pytest.raises(MalformedError, match="running_jobs"):
        parse_policy(base + b'[strikes]\nrunning_jobs = "pause"\n')


class StrikersLeftRun(StruckMidRun):
    """A run the strikers' devices leave at once (each agent stops its SuperNode at its own strike): it fails for want
    of them at the first status look, which is also the first look at which the strike is in force."""

    def run_status(self, run_id: int) -> str:
        now = _now_ms()
        self.registry.record_strike_votes([StrikeVoteRecord(9, "d-ann", "acme", None, now - 1000, None, False)])
        outcome = JobOutcome(run_id=run_id, status="failed", rounds_completed=0, reason="too_few_replies")
        (self.jobs_dir / f"run-{run_id}").mkdir(parents=True, exist_ok=True)
        outcome.write(self.jobs_dir / f"run-{run_id}")
        return "finished:failed"


@pytest.mark.parametrize("running_jobs", ["finish", "stop"])
def test_a_run_the_strikers_left_before_a_look_could_stop_it_failed_by_the_strike_when_the_policy_stops_jobs(
    tmp_path: Path, running_jobs: str
) -> None:
    registry, _ = _members(tmp_path / "registry.sqlite", ["d-ann", "d-bob"])
    try:
        record, lines, stopped = _run_struck(tmp_path, registry, StrikersLeftRun, running_jobs)
        assert record.status == "failed" and stopped == []  # nothing left to stop
        if running_jobs == "stop":
            assert record.reason == "strike"
            assert f"run {FakeRun.RUN_ID} stopped: 1 of 2 members strike against buyer acme (quorum 1)" in lines
        else:
            assert record.reason == "too_few_replies"
    finally:
        registry.close()
