"""Members in charge, at the MID: a signed leave is logged and ends the member's keys and logins (its statement read
stays), strikes are honoured at quorum and end by the same rule, the latest knob and consent are kept per member and
used (knobs for quotes, consent for selection), and the agent's side of each choice. Real SQLite, real Ed25519; on
real processes: tests/test_member_choices_e2e.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from job_requests import job_request
from test_ingest_pipeline import MID, NOW_MS, Fixture, topic
from test_job_start_waiting import _job_run
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from coordinator.federation.job_start import JobRequestError, expected_devices, select_devices
from coordinator.ingest.pipeline import IngestPipeline, Outcome
from coordinator.registry.member_choices import ConsentRecord, KnobSetting, knobs_for
from coordinator.registry.presence import Presence, StrikeVoteRecord
from coordinator.registry.store import Registry
from coordinator.registry.strikes import StrikeTally, StrikeTarget, quorum_needed, refuse_if_struck, strike_refusal
from coordinator.royalties.knob_http import knob_price
from coordinator.royalties.policy import KnobPolicy, RoyaltyPolicy
from edge.agent.controls.decisions import LEAVE_NAME, DeclineReason, decide, owed_choices
from edge.agent.controls.state import (
    MemberControlError,
    MemberState,
    allow,
    allow_every_purpose,
    allow_sensors,
    deny,
    deny_sensors,
    every_sensor,
    set_knob,
)
from edge.agent.controls.watch import describe
from protocol.errors import PolicyViolationError, Reason, StrikeInForceError
from protocol.identity import SignerKey
from protocol.leaves import LeafKind, decode_leaf
from protocol.messages import ConsentPolicy, DeviceStatus, KnobUpdate, LeaveNotice, TaskSensors, consent_sensor_gap
from protocol.topics import UpKind


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


def _logged(fx: Fixture, device: str, kind: UpKind, envelope: bytes) -> int:
    (verdict,) = fx.run(topic(device, kind), envelope)
    assert verdict.outcome is Outcome.ACCEPTED and verdict.leaf_index is not None, verdict.error
    return verdict.leaf_index


# --- leaving --------------------------------------------------------------------------------------------------------


def test_a_leave_notice_is_logged_revokes_the_member_s_keys_and_logins_and_its_next_message_is_refused(
    tmp_path: Path,
) -> None:
    departed: list[list[str]] = []
    fx = Fixture(tmp_path)
    fx.pipeline.on_departed = departed.append
    assert set(fx.registry.active_password_hashes()) == {"dev-a", "dev-b", "dev-c"}

    notice = LeaveNotice(seq=1, device_time_ms=NOW_MS, left_ms=NOW_MS - 5).seal(fx.keys["dev-a"])
    index = _logged(fx, "dev-a", UpKind.LEAVE, notice)
    assert decode_leaf(fx.ledger.leaf(index)).kind is LeafKind.LEAVE
    assert decode_leaf(fx.ledger.leaf(index)).signed == notice  # the member's signed bytes, verbatim
    assert departed == [["dev-a"]]
    assert fx.registry.device("dev-a").revoked  # type: ignore[union-attr]
    assert set(fx.registry.active_password_hashes()) == {"dev-b", "dev-c"}
    (departure,) = fx.registry.departures().values()
    assert (departure.device_id, departure.member_id, departure.leaf_index) == ("dev-a", "member-dev-a", index)

    # The next batch logs the key-revoke leaf and refuses the departed key.
    (refused,) = fx.run(topic("dev-a"), fx.report("dev-a", 2))
    assert refused.reason is Reason.REVOKED_KEY
    kinds = [decode_leaf(fx.ledger.leaf(i)).kind for i in range(fx.ledger.size)]
    assert kinds == [LeafKind.LEAVE, LeafKind.KEY_REVOKE]
    # Resending the notice (its receipt got lost) changes nothing more.
    assert fx.registry.record_departure("member-dev-a", index, NOW_MS) == []


def test_a_departure_a_crash_kept_out_of_the_registry_is_caught_up_from_the_ledger(fx: Fixture, tmp_path: Path) -> None:
    def lost(member: str, leaf_index: int, now_ms: int) -> list[str]:
        raise OSError("crash between the ledger commit and the registry")

    fx.registry.record_departure = lost  # type: ignore[method-assign]
    notice = LeaveNotice(seq=1, device_time_ms=NOW_MS, left_ms=NOW_MS).seal(fx.keys["dev-b"])
    with pytest.raises(OSError):
        fx.run(topic("dev-b", UpKind.LEAVE), notice)
    registry = Registry(tmp_path / "registry.sqlite")
    assert not registry.device("dev-b").revoked  # type: ignore[union-attr]
    IngestPipeline(MID, registry, fx.ledger, fx.dedup, fx.mid_key, 64 * 1024, 10.0, 1000)
    assert registry.device("dev-b").revoked and set(registry.departures()) == {"dev-b"}  # type: ignore[union-attr]


def test_a_member_who_left_is_never_selected_again(tmp_path: Path) -> None:
    registry = _registry(tmp_path, ["d-ann", "d-bob"])
    registry.record_departure("m-d-ann", 3, _now_ms())
    assert [d.device_id for d in select_devices(registry, ())] == ["d-bob"]
    # Named, it is reported as left and not invited (a device the operator revoked is refused outright).
    named = select_devices(registry, ("d-ann", "d-bob"))
    coming, absent = expected_devices(registry, named, job_request(tmp_path), _now_ms(), 180_000)
    assert ([d.device_id for d in coming], absent) == (["d-bob"], {"d-ann": "left"})
    registry.revoke("d-bob", _now_ms())
    with pytest.raises(JobRequestError, match="revoked_device"):
        select_devices(registry, ("d-bob",))


# --- strikes at quorum ----------------------------------------------------------------------------------------------


def _vote(
    device: str, index: int, buyer: str | None = None, purpose: str | None = None, **kw: object
) -> StrikeVoteRecord:
    fields: dict[str, object] = {"start_ms": NOW_MS - 10, "end_ms": None, "withdraw": False} | kw
    return StrikeVoteRecord(index, device, buyer, purpose, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("active", "bps", "least", "needed"),
    [
        *[(4, 5000, 1, 2), (5, 5000, 1, 3), (3, 10_000, 1, 3), (1, 1, 1, 1), (0, 5000, 1, 1), (10, 3333, 1, 4)],
        *[(4, 5000, 3, 3), (2, 5000, 3, 3), (10, 5000, 3, 5), (0, 5000, 0, 1)],
    ],
)
def test_the_quorum_is_a_share_of_the_active_members_rounded_up_and_at_least_min_members(
    active: int, bps: int, least: int, needed: int
) -> None:
    assert quorum_needed(active, bps, least) == needed


def test_a_strike_below_quorum_changes_nothing_at_quorum_refuses_and_ends_by_the_same_rule(tmp_path: Path) -> None:
    registry = _registry(tmp_path, ["d-ann", "d-bob", "d-cid", "d-dan"])  # 4 active members: a quorum of 2 at 50 %
    now = NOW_MS + 100
    registry.record_strike_votes([_vote("d-ann", 1, buyer="acme")])
    assert strike_refusal(registry, "acme", "research", 5000, now) is None
    registry.record_strike_votes([_vote("d-bob", 2, buyer="acme", purpose="research")])
    why = strike_refusal(registry, "acme", "research", 5000, now)
    assert why == "2 of 4 members strike against buyer acme; buyer acme, purpose research (quorum 2)"
    with pytest.raises(StrikeInForceError) as refused:
        refuse_if_struck(registry, "acme", "research", 5000, now)
    assert refused.value.reason is Reason.STRIKE
    # bob strikes only acme's research: acme's other purposes and other buyers are not struck.
    assert strike_refusal(registry, "acme", "ads", 5000, now) is None
    assert strike_refusal(registry, "globex", "research", 5000, now) is None
    # A higher quorum needs more strikers.
    assert strike_refusal(registry, "acme", "research", 7500, now) is None
    # bob withdraws: the count drops below the quorum and jobs are taken again.
    registry.record_strike_votes(
        [_vote("d-bob", 3, buyer="acme", purpose="research", end_ms=NOW_MS + 50, withdraw=True)]
    )
    assert strike_refusal(registry, "acme", "research", 5000, now) is None
    assert strike_refusal(registry, "acme", "research", 5000, NOW_MS + 49) is not None  # before the withdrawal


def test_each_member_counts_once_and_members_who_left_do_not_count(tmp_path: Path) -> None:
    registry = _registry(tmp_path, ["d-ann", "d-bob", "d-cid"])
    now = _now_ms()
    key = SignerKey.generate("d-ann2")  # ann's second device
    registry.add_invite("inv-ann2", "m-d-ann", now, now + 10_000)
    registry.redeem_invite("inv-ann2", now, "d-ann2", key.verifier, "$7$101$x$y")
    registry.record_strike_votes([_vote("d-ann", 1, purpose="ads"), _vote("d-ann2", 2, purpose="ads")])
    tally = StrikeTally(registry.strike_votes(), registry.devices(), 10_000, NOW_MS)
    (count,) = tally.counts()
    assert (count.target, count.strikers, count.needed, count.in_force) == (
        StrikeTarget(None, "ads"),
        ("m-d-ann",),
        3,
        False,
    )
    registry.record_strike_votes([_vote("d-bob", 3, purpose="ads")])
    registry.record_departure("m-d-cid", 9, now)  # 2 active members left, both striking: in force
    assert strike_refusal(registry, "acme", "ads", 10_000, NOW_MS) == (
        "2 of 2 members strike against purpose ads (quorum 2)"
    )
    registry.record_departure("m-d-bob", 10, now)  # a striker leaves: its vote no longer counts, 1 of 1
    assert StrikeTally(registry.strike_votes(), registry.devices(), 10_000, NOW_MS).counts()[0].strikers == ("m-d-ann",)


def test_job_start_refuses_a_job_a_strike_in_force_covers_with_reason_strike(tmp_path: Path) -> None:
    registry = _registry(tmp_path, ["d-ann", "d-bob"])
    now = _now_ms()
    registry.record_strike_votes([_vote("d-ann", 1, buyer="acme", start_ms=now - 1000)])
    run, _ = _job_run(tmp_path, registry, job_request(tmp_path), came=[])
    with pytest.raises(JobRequestError) as refused:
        run.run()
    assert refused.value.reason == "strike"
    assert "1 of 2 members strike against buyer acme (quorum 1)" in str(refused.value)
    assert run.book.read("job-1") is None  # nothing recorded, nobody invited
    assert run.sender.sent == []  # type: ignore[attr-defined]


def strike_policy_toml(quorum_bps: int, min_members: int, running_jobs: str = "finish") -> str:
    """A MID policy file (coordinator/policy) with this strike quorum and what it does to running jobs, the default
    money terms, research and ads."""
    purposes = "".join(
        f'[[purposes]]\ncode = "{code}"\ndpv = "{dpv}"\nlabel = "{code}"\nlicence = "{code} only"\n'
        for code, dpv in (("research", "dpv:ResearchAndDevelopment"), ("ads", "dpv:Advertising"))
    )
    return (
        "fee_bps = 1500\n[knob]\nbase_price_minor = 1000\nalpha_milli = 693\nmin_price_minor = 100\n"
        f"max_price_minor = 100000\n[strikes]\nquorum_bps = {quorum_bps}\nmin_members = {min_members}\n"
        f'running_jobs = "{running_jobs}"\n{purposes}'
    )


def test_coordinator_strikes_shows_each_target_its_count_and_whether_it_is_in_force(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(f'mid = "riverside"\ndata_dir = "{tmp_path / "data"}"\n')
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "policy.toml").write_text(strike_policy_toml(5000, 1))
    registry = _registry(tmp_path / "data", ["d-ann", "d-bob", "d-cid"], name="registry.sqlite")
    start = _now_ms() - 1000
    registry.record_strike_votes(
        [
            _vote("d-ann", 1, buyer="acme", start_ms=start),
            _vote("d-bob", 2, buyer="acme", start_ms=start),
            _vote("d-cid", 3, purpose="ads", start_ms=start),
        ]
    )
    result = CliRunner().invoke(coordinator_app, ["strikes", "--config", str(config)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        "3 active member(s); quorum 2 (50 % of them, at least 1); running jobs finish when a strike comes into force"
    )
    # The policy's min_members raises the quorum above the share: with 3 members and at least 3, not in force.
    (tmp_path / "data" / "policy.toml").write_text(strike_policy_toml(5000, 3))
    result = CliRunner().invoke(coordinator_app, ["strikes", "--config", str(config)])
    assert result.output.splitlines()[2] == "buyer acme\t2\t3\tno\tm-d-ann,m-d-bob\t-"
    assert lines[1:] == [
        "target\tstrikers\tquorum\tin_force\tmembers\tlogged",
        "buyer acme\t2\t2\tyes\tm-d-ann,m-d-bob\t-",  # no serve has logged it (no ledger here)
        "purpose ads\t1\t2\tno\tm-d-cid\t-",
    ]


# --- knob and consent -------------------------------------------------------------------------------------------------


def test_the_latest_logged_knob_and_consent_of_each_member_are_kept(fx: Fixture) -> None:
    key = fx.keys["dev-a"]
    _logged(fx, "dev-a", UpKind.KNOB, KnobUpdate(seq=1, device_time_ms=NOW_MS, bias_milli=250).seal(key))
    later = _logged(fx, "dev-a", UpKind.KNOB, KnobUpdate(seq=2, device_time_ms=NOW_MS, bias_milli=-400).seal(key))
    consent = ConsentPolicy(seq=3, device_time_ms=NOW_MS, allowed_purposes=("research",), denied_buyers=("globex",))
    consent_index = _logged(fx, "dev-a", UpKind.CONSENT, consent.seal(key))
    anything = ConsentPolicy(seq=1, device_time_ms=NOW_MS, allowed_purposes=(), any_purpose=True)
    _logged(fx, "dev-b", UpKind.CONSENT, anything.seal(fx.keys["dev-b"]))

    knobs = fx.registry.knobs()
    assert (knobs["member-dev-a"].bias_milli, knobs["member-dev-a"].leaf_index) == (-400, later)
    assert knobs_for(["member-dev-a", "member-dev-b"], knobs) == {"member-dev-a": -400, "member-dev-b": 0}
    consents = fx.registry.consents()
    assert consents["member-dev-a"] == ConsentRecord("member-dev-a", ("research",), ("globex",), consent_index)
    assert consents["member-dev-b"].allowed_purposes is None  # every purpose
    # An older leaf (a catch-up replaying the log) never overwrites a newer one.
    fx.registry.record_knob(knobs["member-dev-a"].__class__("member-dev-a", 999, later - 1, NOW_MS))
    assert fx.registry.knobs()["member-dev-a"].bias_milli == -400
    kinds = [decode_leaf(fx.ledger.leaf(i)).kind for i in range(fx.ledger.size)]
    assert kinds == [LeafKind.KNOB, LeafKind.KNOB, LeafKind.CONSENT, LeafKind.CONSENT]


def test_job_start_keeps_the_invited_members_knobs_at_its_start_for_the_settlement(tmp_path: Path) -> None:
    registry = _registry(tmp_path, ["d-ann", "d-bob"])
    registry.record_knob(KnobSetting("m-d-ann", 700, 5, NOW_MS))
    run, lines = _job_run(tmp_path, registry, job_request(tmp_path), came=[100, 101])
    record = run.run()
    assert record.status == "completed", (record.reason, lines)
    assert record.knobs_milli == {"m-d-ann": 700, "m-d-bob": 0}
    registry.record_knob(KnobSetting("m-d-ann", -200, 6, NOW_MS))  # changed after the start: not this job's
    assert run.book.read("job-1").knobs_milli == {"m-d-ann": 700, "m-d-bob": 0}  # type: ignore[union-attr]


def test_a_consent_policy_naming_purposes_and_any_purpose_is_refused() -> None:
    with pytest.raises(ValueError, match="any_purpose"):
        ConsentPolicy(seq=1, device_time_ms=NOW_MS, allowed_purposes=("research",), any_purpose=True)


def test_the_coordinator_never_selects_a_member_whose_consent_excludes_the_job(tmp_path: Path) -> None:
    registry = _registry(tmp_path, ["d-ann", "d-bob", "d-cid"])
    registry.record_consent(ConsentRecord("m-d-ann", ("ads",), (), 1))
    registry.record_consent(ConsentRecord("m-d-bob", None, ("acme",), 2))
    registry.record_consent(ConsentRecord("m-d-cid", ("research", "ads"), ("globex",), 3))
    request = job_request(tmp_path)  # acme, research
    coming, absent = expected_devices(registry, select_devices(registry, ()), request, _now_ms(), 180_000)
    assert [d.device_id for d in coming] == ["d-cid"]
    assert absent == {"d-ann": "consent does not allow purpose research", "d-bob": "consent denies buyer acme"}


def test_sensors_per_task_are_logged_kept_and_a_member_whose_consent_gives_the_task_no_sensor_is_not_selected(
    fx: Fixture, tmp_path: Path
) -> None:
    # Logged and kept from the signed ConsentPolicy, as ingest keeps it.
    key = fx.keys["dev-a"]
    sensors = (TaskSensors(task_id="env-forecast", sensors=("bme280",)),)
    consent = ConsentPolicy(seq=1, device_time_ms=NOW_MS, allowed_purposes=(), any_purpose=True, task_sensors=sensors)
    index = _logged(fx, "dev-a", UpKind.CONSENT, consent.seal(key))
    assert fx.registry.consents()["member-dev-a"] == ConsentRecord("member-dev-a", None, (), index, sensors)
    # Without sensors per task the policy's bytes are what they were before the field existed.
    plain = ConsentPolicy(seq=1, device_time_ms=NOW_MS, allowed_purposes=(), any_purpose=True)
    assert b"task_sensors" not in plain.canonical_json()

    # Selection: plaid-appliance takes plaid data only (job_request's task).
    registry = _registry(tmp_path, ["d-ann", "d-bob", "d-cid"])
    registry.record_consent(
        ConsentRecord("m-d-ann", None, (), 1, (TaskSensors(task_id="plaid-appliance", sensors=("bme280",)),))
    )
    registry.record_consent(
        ConsentRecord("m-d-bob", None, (), 2, (TaskSensors(task_id="plaid-appliance", sensors=("plaid",)),))
    )
    registry.record_consent(ConsentRecord("m-d-cid", None, (), 3, (TaskSensors(task_id="env-forecast", sensors=()),)))
    request = job_request(tmp_path)
    assert request.task_id == "plaid-appliance"
    coming, absent = expected_devices(registry, select_devices(registry, ()), request, _now_ms(), 180_000)
    assert [d.device_id for d in coming] == ["d-bob", "d-cid"]  # cid narrowed another task only
    assert absent == {
        "d-ann": "consent gives task plaid-appliance no sensor of its inputs (allowed: bme280; it takes: plaid)"
    }


def test_the_member_narrows_and_widens_the_sensors_a_task_may_use_and_the_agent_sends_them() -> None:
    state = allow_sensors(MemberState(), NOW_MS, "env-forecast", ["simulated", "bme280"])
    assert state.task_sensors == (TaskSensors(task_id="env-forecast", sensors=("bme280", "simulated")),)
    assert state.consent_ms == NOW_MS
    state = deny_sensors(state, NOW_MS + 1, "env-forecast", ["bme280"])
    assert consent_sensor_gap(state.task_sensors, "env-forecast", ("simulated", "bme280")) == (("simulated",), None)
    assert consent_sensor_gap(state.task_sensors, "host-anomaly", ("linux",)) == (None, None)  # not listed: every
    (owed,) = owed_choices(state, lambda name: False, delivered=True)
    assert owed.make(1, NOW_MS).task_sensors == state.task_sensors  # type: ignore[union-attr]
    with pytest.raises(MemberControlError, match="no_sensor_list"):
        deny_sensors(state, NOW_MS, "host-anomaly", ["linux"])
    assert every_sensor(state, NOW_MS + 2, "env-forecast").task_sensors == ()
    assert "task env-forecast may use: simulated" in describe(state, NOW_MS)


def test_the_knob_price_is_the_quote_s_reservation_price_and_spans_the_policy_s_bounds() -> None:
    policy = RoyaltyPolicy(
        version=3, fee_bps=1500, knob=KnobPolicy(base_price_minor=1000, min_price_minor=600, max_price_minor=1500)
    )
    price = knob_price(policy, "EUR", 500)
    assert (price.price_minor, price.base_price_minor) == (1414, 1000)  # 1000 * e^(0.693 * 0.5), rounded
    assert (price.lowest_minor, price.highest_minor) == (600, 1500)  # 500 and 2000 clamped to the bounds
    with pytest.raises(PolicyViolationError):
        knob_price(policy, "EUR", 1001)


# --- the agent's side -------------------------------------------------------------------------------------------------


def test_the_agent_declines_an_invitation_its_member_s_consent_excludes() -> None:
    state = allow(MemberState(), NOW_MS, ["research"], [])
    assert decide(state, "acme", "research", NOW_MS).run
    declined = decide(state, "acme", "ads", NOW_MS)
    assert (declined.reason, declined.detail) == (DeclineReason.CONSENT_EXCLUDES, "consent does not allow purpose ads")
    state = deny(state, NOW_MS + 1, [], ["acme"])
    assert decide(state, "acme", "research", NOW_MS).reason is DeclineReason.CONSENT_EXCLUDES
    assert decide(allow_every_purpose(allow(state, NOW_MS + 2, [], ["acme"]), NOW_MS + 3), "acme", "ads", NOW_MS).run
    with pytest.raises(MemberControlError, match="no_purpose_list"):
        deny(MemberState(), NOW_MS, ["ads"], [])  # the device does not know the whole vocabulary


def test_the_member_s_knob_and_consent_are_described_with_its_other_choices() -> None:
    state = deny(allow(set_knob(MemberState(), NOW_MS, -250), NOW_MS, ["research"], []), NOW_MS, [], ["globex"])
    assert describe(state, NOW_MS) == "taking part; knob -0.250; purposes allowed: research; buyers denied: globex"
    assert describe(MemberState(), NOW_MS) == "taking part"


def test_the_agent_owes_one_signed_message_per_knob_and_consent_change_and_a_leave_only_once_delivered() -> None:
    sent: set[str] = set()
    state = set_knob(MemberState(), NOW_MS, 300)
    state = deny(allow(state, NOW_MS + 1, ["research"], []), NOW_MS + 2, [], ["globex"])
    owed = owed_choices(state, sent.__contains__, delivered=True)
    assert [(c.kind, c.name) for c in owed] == [("knob", f"knob-{NOW_MS}"), ("consent", f"consent-{NOW_MS + 2}")]
    knob, consent = (c.make(7, NOW_MS) for c in owed)
    assert isinstance(knob, KnobUpdate) and knob.bias_milli == 300 and knob.seq == 7
    assert isinstance(consent, ConsentPolicy)
    assert (consent.allowed_purposes, consent.denied_buyers, consent.any_purpose) == (("research",), ("globex",), False)
    sent |= {c.name for c in owed}
    assert owed_choices(state, sent.__contains__, delivered=True) == []  # each is sent once
    with pytest.raises(MemberControlError, match="bad_knob"):
        set_knob(state, NOW_MS, 1001)

    left = state.model_copy(update={"left_ms": NOW_MS + 5})
    assert owed_choices(left, sent.__contains__, delivered=False) == []  # reports still on their way: wait
    (leave,) = owed_choices(left, sent.__contains__, delivered=True)
    notice = leave.make(8, NOW_MS + 6)
    assert leave.name == LEAVE_NAME and isinstance(notice, LeaveNotice) and notice.left_ms == NOW_MS + 5
    assert owed_choices(left, {*sent, LEAVE_NAME}.__contains__, delivered=True) == []


# --- helpers ----------------------------------------------------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _registry(root: Path, devices: list[str], name: str = "reg.sqlite") -> Registry:
    """Devices of one member each (`m-{device}`), with Flower nodes, heard from just now."""
    registry = Registry(root / name)
    now = _now_ms()
    for i, device in enumerate(devices):
        registry.add_invite(f"inv-{device}", f"m-{device}", now, now + 10_000)
        registry.redeem_invite(f"inv-{device}", now, device, SignerKey.generate(device).verifier, "$7$101$x$y")
        registry.add_flower_node(device, 100 + i, f"ecdsa-sha2-nistp256 {device}", now)
    registry.record_presence([Presence(d, DeviceStatus.IDLE, now - 1000, now, offline=False) for d in devices])
    return registry
