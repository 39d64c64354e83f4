"""`job start` waits only for members who may come, says whom it waits for and whom not, and prints each round as
it ends: the whole JobRun against the real registry and job book, with the SuperLink's `flwr` CLI and the broker
replaced by recorders (a fake run that writes what the ServerApp writes). On real processes:
tests/test_job_presence_e2e.py."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
from job_requests import job_request

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, RoundCapture
from coordinator.federation.job import JobOutcome
from coordinator.federation.job_start import (
    COMPLETED,
    JobBook,
    JobRequest,
    JobRun,
    RoundProgress,
    expected_devices,
    select_devices,
)
from coordinator.ledger.store import LedgerStore
from coordinator.mid_key import mid_key_name
from coordinator.policy.document import parse_policy
from coordinator.policy.reputation import logged_scores
from coordinator.registry.presence import Presence, StrikeVoteRecord
from coordinator.registry.store import Registry
from protocol.identity import SignerKey
from protocol.job_log import JobDeviceEntry, JobLogRecord, MemberValue
from protocol.leaves import Leaf, LeafKind
from protocol.messages import DeviceStatus

NODES = {"d-ann": 11, "d-bob": 22, "d-cid": 33, "d-dan": 44, "d-eve": 55}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """Five devices with Flower nodes: ann and bob heard from just now, cid paused, dan striking against acme, eve
    not heard from since long ago."""
    reg = Registry(tmp_path / "registry.sqlite")
    now = _now_ms()
    for device, node in NODES.items():
        reg.add_invite(f"inv-{device}", f"m-{device}", now, now + 10_000)
        reg.redeem_invite(f"inv-{device}", now, device, SignerKey.generate(device).verifier, "$7$101$x$y")
        reg.add_flower_node(device, node, f"ecdsa-sha2-nistp256 {device}", now)
    statuses = {"d-ann": DeviceStatus.IDLE, "d-bob": DeviceStatus.IDLE, "d-cid": DeviceStatus.PAUSED}
    statuses |= {"d-dan": DeviceStatus.STRIKING}
    heard = [Presence(d, s, now - 60_000, now - 1000, offline=False) for d, s in statuses.items()]
    heard.append(Presence("d-eve", DeviceStatus.IDLE, now - 10**7, now - 10**7, offline=False))
    reg.record_presence(heard)
    reg.record_strike_votes([StrikeVoteRecord(4, "d-dan", "acme", None, now - 60_000, None, False)])
    return reg


def _request(tmp_path: Path, **overrides: object) -> JobRequest:
    """A job that would wait 10 minutes for devices to join, unless the test says otherwise."""
    return job_request(tmp_path, **{"join_timeout_s": 600, **overrides})


class FakeRun:
    """The SuperLink as `job start` sees it: `submit_run` starts a run that has already written, under jobs_dir,
    what the ServerApp writes (round captures, per-round validation, the outcome) for the nodes that came."""

    RUN_ID = 7

    def __init__(self, jobs_dir: Path, came: list[int]) -> None:
        self.jobs_dir = jobs_dir
        self.came = came
        self.submitted: list[dict[str, str | int | float]] = []

    def submit_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        self.submitted.append(run_config)
        captures = CaptureDirectory(self.jobs_dir / f"run-{self.RUN_ID}")
        rounds = int(run_config["num-rounds"])
        for r in range(1, rounds + 1):
            updates = tuple(CapturedUpdate(r, node, {}, f"u{node}", "g", 10, 1, {}) for node in self.came)
            captures.on_round(RoundCapture(self.RUN_ID, r, "g", updates, ()))
            captures.record_validation(r, {"accuracy": 0.5 + r / 10, "loss": 1.0}, 2.5)
        outcome = JobOutcome(
            run_id=self.RUN_ID, status="finished", rounds_completed=rounds, final_model_sha256="ab" * 32
        )
        outcome.write(captures.directory)
        return self.RUN_ID

    def run_status(self, run_id: int) -> str:
        return COMPLETED

    def stop_run(self, run_id: int) -> None:
        raise AssertionError("the run is not stopped")


class Invitations:
    def __init__(self) -> None:
        self.sent: list[list[str]] = []

    def send_all(self, messages: list[tuple[str, bytes]]) -> None:
        self.sent.append([topic.split("/")[3] for topic, _ in messages])


def _job_run(tmp_path: Path, registry: Registry, request: JobRequest, came: list[int]) -> tuple[JobRun, list[str]]:
    lines: list[str] = []
    run = JobRun(
        request=request,
        registry=registry,
        mid_key=SignerKey.generate(mid_key_name("riverside")),
        mid="riverside",
        control=FakeRun(tmp_path / "jobs", came),
        sender=Invitations(),  # type: ignore[arg-type]
        jobs_dir=tmp_path / "jobs",
        book=JobBook(tmp_path / "job-book"),
        report=lines.append,
        poll_s=0.01,
    )
    return run, lines


def test_the_job_invites_and_selects_only_the_members_who_may_come_and_says_whom_not_and_why(
    tmp_path: Path, registry: Registry
) -> None:
    run, lines = _job_run(tmp_path, registry, _request(tmp_path), came=[11, 22])
    record = run.run()
    assert record.status == "completed", (record.reason, lines)
    assert record.not_waited_for == {
        "d-cid": "paused",
        "d-dan": "striking against buyer acme",
        "d-eve": "offline: no heartbeat lately",
    }
    assert [d.device_id for d in record.invited] == ["d-ann", "d-bob"]
    assert sorted(record.selected_node_ids) == [11, 22]
    assert run.control.submitted[0]["selected-nodes"] == "11 22"  # type: ignore[attr-defined]
    assert run.sender.sent == [["d-ann", "d-bob"], ["d-ann", "d-bob"]]  # type: ignore[attr-defined]
    assert lines[0] == (
        "not waiting for 3 device(s): d-cid (paused), d-dan (striking against buyer acme),"
        " d-eve (offline: no heartbeat lately)"
    )
    assert lines[1] == "invited 2 device(s); the first round waits up to 600 s for them to join: d-ann, d-bob"
    # The run was submitted at once, not after a join timeout: the first round waits for the devices instead.
    assert record.submitted_ms is not None and record.submitted_ms - record.started_ms < 600_000
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 2
    assert rounds[0].endswith("(the round 2.5 s), 2 node(s), accuracy 0.6000, loss 1.0000")
    assert JobBook(tmp_path / "job-book").read("job-1") == record


def test_a_device_that_did_not_join_the_first_round_is_named(tmp_path: Path, registry: Registry) -> None:
    run, lines = _job_run(tmp_path, registry, _request(tmp_path, rounds=1), came=[11])
    record = run.run()
    assert record.status == "completed"
    assert "not joined within 600 s: d-bob" in lines


def test_a_buyer_nobody_strikes_against_waits_for_the_striker_too(tmp_path: Path, registry: Registry) -> None:
    devices = select_devices(registry, ())
    coming, absent = expected_devices(registry, devices, _request(tmp_path, buyer="globex"), _now_ms(), 180_000)
    assert [d.device_id for d in coming] == ["d-ann", "d-bob", "d-dan"]
    assert set(absent) == {"d-cid", "d-eve"}


def test_a_member_below_the_policys_reputation_minimum_for_the_jobs_purpose_is_not_invited_and_named(
    tmp_path: Path, registry: Registry
) -> None:
    # The log's one job: ann valued in all 10 rounds, bob screened out of 3 of his 4 (cid, dan, eve: 500, no job).
    job = JobLogRecord(
        job_id="job-old", run_id=1, task_id="plaid-appliance", task_version=1, purpose="research", buyer="acme",
        status="completed", rounds=10, rounds_completed=10, started_ms=_now_ms() - 9, ended_ms=_now_ms(),
        devices=tuple(JobDeviceEntry(device=f"d-{m}", member=f"m-d-{m}", node_id=n, selected=True)
                      for m, n in (("ann", 11), ("bob", 22))),
        attribution=(
            MemberValue(member="m-d-ann", value_units=900, rounds=10, excluded_rounds=0),
            MemberValue(member="m-d-bob", value_units=100, rounds=4, excluded_rounds=3),
        ),
    )  # fmt: skip
    ledger_path = tmp_path / "ledger.sqlite"
    with LedgerStore.open(ledger_path, SignerKey.generate("midgate/riverside")) as ledger:
        ledger.append_leaves([Leaf(LeafKind.JOB, job.canonical_json())])
    scores = functools.partial(logged_scores, ledger_path)  # what `job start` passes (job_cli._run)
    bob = scores(["m-d-bob"])["m-d-bob"]
    assert bob < 500 < scores(["m-d-ann"])["m-d-ann"]
    policy = parse_policy(
        b"fee_bps = 1000\n[knob]\nbase_price_minor = 1000\nmin_price_minor = 100\nmax_price_minor = 10000\n"
        b"[reputation]\nmin_milli = { default = 0, health = 400 }\n"
    )
    run, lines = _job_run(tmp_path, registry, _request(tmp_path, purpose="health"), came=[11])
    run.reputation = (policy, scores)
    record = run.run()
    assert record.status == "completed", (record.reason, lines)
    assert [d.device_id for d in record.invited] == ["d-ann"]
    why = f"reputation {bob} below the policy's minimum 400 for purpose health"
    assert record.not_waited_for["d-bob"] == why
    assert lines[0].startswith("not waiting for 4 device(s): d-bob (" + why + "), d-cid (paused)")
    # A research job (the default class, minimum 0) waits for bob as before; so does a job run with no policy.
    for request, reputation in ((_request(tmp_path), (policy, scores)), (_request(tmp_path, purpose="health"), None)):
        coming, absent = expected_devices(
            registry, select_devices(registry, ()), request, _now_ms(), 180_000, reputation=reputation
        )
        assert [d.device_id for d in coming] == ["d-ann", "d-bob"], absent


def test_with_fewer_members_able_to_come_than_min_nodes_nothing_is_invited_or_submitted(
    tmp_path: Path, registry: Registry
) -> None:
    request = _request(tmp_path, devices=("d-ann", "d-cid", "d-dan"), min_nodes=2)
    run, lines = _job_run(tmp_path, registry, request, came=[])
    record = run.run()
    assert (record.status, record.reason, record.run_id) == ("failed", "too_few_nodes", None)
    assert run.sender.sent == [] and run.control.submitted == []  # type: ignore[attr-defined]
    assert lines[-1] == "1 device(s) can take part, fewer than min_nodes 2"


def test_round_progress_prints_a_round_only_once_both_its_capture_and_its_validation_are_written(
    tmp_path: Path,
) -> None:
    lines: list[str] = []
    request = _request(tmp_path, rounds=3)
    progress = RoundProgress(tmp_path, 7, {11: "d-ann", 22: "d-bob"}, request, lines.append, lambda: 12.0, 2.0)
    captures = CaptureDirectory(tmp_path / "run-7")
    captures.on_round(RoundCapture(7, 1, "g", (CapturedUpdate(1, 11, {}, "u", "g", 1, 1, {}),), ()))
    progress.show()
    assert lines == []  # captured, not yet scored
    captures.record_validation(1, {"accuracy": 0.25}, 4.0)
    progress.show()
    progress.show()
    assert lines == [
        "round 1/3: 10.0 s (the round 4.0 s), 1 node(s), accuracy 0.2500",
        "not joined within 600 s: d-bob",
    ]


@pytest.mark.parametrize("one_player", [True, False])
def test_a_members_devices_reach_the_serverapp_as_one_member_unless_the_mid_turns_it_off(
    tmp_path: Path, registry: Registry, one_player: bool
) -> None:
    # Ann's hub: a second device enrolled with a second invite of Ann's member id, heard from just now.
    now = _now_ms()
    registry.add_invite("inv-d-ann-hub", "m-d-ann", now, now + 10_000)
    registry.redeem_invite("inv-d-ann-hub", now, "d-ann-hub", SignerKey.generate("d-ann-hub").verifier, "$7$101$x$y")
    registry.add_flower_node("d-ann-hub", 66, "ecdsa-sha2-nistp256 d-ann-hub", now)
    registry.record_presence([Presence("d-ann-hub", DeviceStatus.IDLE, now - 60_000, now - 1000, offline=False)])
    run, lines = _job_run(tmp_path, registry, _request(tmp_path, rounds=1), came=[11, 22, 66])
    run.one_player_per_member = one_player
    record = run.run()
    assert record.status == "completed", (record.reason, lines)
    assert run.control.submitted[0]["member-groups"] == ("11,66" if one_player else "")  # type: ignore[attr-defined]
