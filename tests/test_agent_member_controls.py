"""The member's choices on the device (pause, resume, leave, strike, unstrike): the state file, the transitions, the
decision table (invitation x state -> run or decline), the votes owed, the daemon's view of the file, the commands.

No mocks: real files, real Ed25519 signatures, real outbox (SQLite), the real typer app."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import stat
import time
from pathlib import Path

import pytest
from mqtt_fixtures import contribution_body, signed_invitation
from typer.testing import CliRunner

from edge.agent.controls.commands import apply, parse_until, vote_states
from edge.agent.controls.decisions import (
    DeclineReason,
    OwedVote,
    decide,
    heartbeat_status,
    owed_votes,
    strike_vote,
    vote_name,
)
from edge.agent.controls.state import (
    MAX_MEMBER_FILE,
    MEMBER_FILE,
    ControlReason,
    MemberControlError,
    MemberState,
    Strike,
    leave,
    load_member_state,
    pause,
    resume,
    save_member_state,
    strike,
    unstrike,
)
from edge.agent.controls.watch import MemberControls
from edge.agent.job_node import NONCES_FILE, JobNode
from edge.agent.ledger_view import SettledReport
from edge.agent.membership import Membership, MembershipRecord
from edge.agent.outbox import Outbox
from edge.federated.spool import read_record, write_body
from edge.sensors.export import WindowSource
from midgate_cli import app
from protocol.enrolment import BrokerCredentials
from protocol.envelope import decode, open_envelope
from protocol.errors import MalformedError
from protocol.identity import SignerKey
from protocol.messages import DeviceStatus, StrikeVote

NOW = 1_790_000_000_000
HOUR = 3_600_000


def _strike(buyer: str | None = "acme", purpose: str | None = None, **kw: int | None) -> Strike:
    fields: dict[str, object] = {"id": secrets.token_hex(8), "target_buyer": buyer, "target_purpose": purpose}
    fields |= {"start_ms": NOW - HOUR} | kw
    return Strike.model_validate(fields)


# --- the state file -------------------------------------------------------------------------------------------------


def test_missing_file_is_the_default_and_a_saved_state_survives_a_reload(tmp_path: Path) -> None:
    assert load_member_state(tmp_path) == MemberState()
    state = strike(pause(MemberState(), NOW), NOW, "acme", "ads", NOW + HOUR)[0]
    save_member_state(tmp_path, state)
    assert load_member_state(tmp_path) == state  # what a reboot reads
    assert stat.S_IMODE((tmp_path / MEMBER_FILE).stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [MEMBER_FILE]  # no temporary file left behind


def test_save_replaces_the_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_member_state(tmp_path, pause(MemberState(), NOW))
    before = (tmp_path / MEMBER_FILE).read_bytes()
    inode = (tmp_path / MEMBER_FILE).stat().st_ino

    def crash(src: object, dst: object) -> None:
        raise OSError("power cut before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_member_state(tmp_path, leave(MemberState(), NOW))
    monkeypatch.undo()
    # A crash before the rename leaves the old file whole; readers never see a half-written one.
    assert (tmp_path / MEMBER_FILE).read_bytes() == before
    assert load_member_state(tmp_path).paused_ms == NOW
    save_member_state(tmp_path, leave(MemberState(), NOW))
    assert (tmp_path / MEMBER_FILE).stat().st_ino != inode  # a new file renamed over the old one


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", ControlReason.MALFORMED),
        (b"", ControlReason.MALFORMED),
        (b'{"v": 2}', ControlReason.MALFORMED),
        (b'{"v": 1, "paused": true}', ControlReason.MALFORMED),  # unknown field: a typo must not read as "not paused"
        (b'{"v": 1, "paused_ms": "1790000000000"}', ControlReason.MALFORMED),  # strict: no str -> int
        (b'{"v": 1, "strikes": [{"id": "0123456789abcdef", "start_ms": 1790000000000}]}', ControlReason.MALFORMED),
        (b" " * (MAX_MEMBER_FILE + 1), ControlReason.TOO_LARGE),
    ],
    ids=["truncated", "empty", "version", "unknown-field", "string-time", "strike-without-target", "too-large"],
)
def test_a_bad_file_is_a_clear_error_and_stays_as_it_is(tmp_path: Path, content: bytes, reason: ControlReason) -> None:
    (tmp_path / MEMBER_FILE).write_bytes(content)
    with pytest.raises(MemberControlError) as refused:
        load_member_state(tmp_path)
    assert refused.value.reason is reason
    assert str(tmp_path / MEMBER_FILE) in str(refused.value)
    # A command on a bad file changes nothing.
    with pytest.raises(MemberControlError):
        apply(tmp_path, pause)
    assert (tmp_path / MEMBER_FILE).read_bytes() == content


# --- transitions ----------------------------------------------------------------------------------------------------


def test_pause_resume_leave_transitions() -> None:
    paused = pause(MemberState(), NOW)
    assert paused.paused_ms == NOW and pause(paused, NOW + 5) is paused  # pausing twice keeps the first time
    assert resume(paused, NOW + 1).paused_ms is None
    assert resume(MemberState(), NOW) == MemberState()
    left = leave(paused, NOW + 2)
    assert left.left_ms == NOW + 2 and leave(left, NOW + 3) is left
    for command in (pause, resume):
        with pytest.raises(MemberControlError) as refused:
            command(left, NOW + 4)
        assert refused.value.reason is ControlReason.ALREADY_LEFT and refused.value.details == {"left_ms": NOW + 2}
    with pytest.raises(MemberControlError) as no_strike:
        strike(left, NOW + 4, "acme", None)
    assert no_strike.value.reason is ControlReason.ALREADY_LEFT


def test_strike_and_unstrike_transitions() -> None:
    with pytest.raises(MemberControlError) as no_target:
        strike(MemberState(), NOW, None, None)
    assert no_target.value.reason is ControlReason.NO_TARGET
    with pytest.raises(MemberControlError) as past:
        strike(MemberState(), NOW, "acme", None, NOW - 1)
    assert past.value.reason is ControlReason.BAD_SPAN and past.value.details == {"now_ms": NOW, "found": NOW - 1}
    with pytest.raises(MemberControlError) as bad_id:
        strike(MemberState(), NOW, "Acme/#", None)
    assert bad_id.value.reason is ControlReason.MALFORMED

    one, acme = strike(MemberState(), NOW, "acme", None)
    assert strike(one, NOW + 1, "acme", None) == (one, acme)  # striking twice is one strike
    two, ads = strike(one, NOW + 1, None, "ads")
    assert [s.id for s in two.active_strikes(NOW + 2)] == [acme.id, ads.id]

    after, withdrawn = unstrike(two, NOW + 3, buyer="acme")
    assert withdrawn == [acme] and [s.id for s in after.active_strikes(NOW + 4)] == [ads.id]
    assert after.strikes[0].withdrawn_ms == NOW + 3  # kept: its vote still needs withdrawing
    with pytest.raises(MemberControlError) as nothing:
        unstrike(after, NOW + 4, buyer="acme")
    assert nothing.value.reason is ControlReason.NO_SUCH_STRIKE
    assert unstrike(after, NOW + 4)[0].active_strikes(NOW + 5) == []


# --- decisions ------------------------------------------------------------------------------------------------------

ACME_ADS = ("acme", "ads")
STRIKING, PAUSED = DeclineReason.MEMBER_STRIKING, DeclineReason.MEMBER_PAUSED
DECISIONS = [
    ("default", MemberState(), ACME_ADS, None),
    ("paused", MemberState(paused_ms=NOW), ACME_ADS, DeclineReason.MEMBER_PAUSED),
    ("left", MemberState(left_ms=NOW), ACME_ADS, DeclineReason.MEMBER_LEFT),
    ("left-and-paused", MemberState(left_ms=NOW, paused_ms=NOW), ACME_ADS, DeclineReason.MEMBER_LEFT),
    ("unreadable", None, ACME_ADS, DeclineReason.STATE_UNREADABLE),
    ("strike-buyer", MemberState(strikes=(_strike("acme"),)), ACME_ADS, DeclineReason.MEMBER_STRIKING),
    ("strike-other-buyer", MemberState(strikes=(_strike("globex"),)), ACME_ADS, None),
    ("strike-purpose", MemberState(strikes=(_strike(None, "ads"),)), ACME_ADS, DeclineReason.MEMBER_STRIKING),
    ("strike-other-purpose", MemberState(strikes=(_strike(None, "research"),)), ACME_ADS, None),
    (
        "strike-buyer-for-purpose",
        MemberState(strikes=(_strike("acme", "ads"),)),
        ACME_ADS,
        DeclineReason.MEMBER_STRIKING,
    ),
    ("strike-buyer-other-purpose", MemberState(strikes=(_strike("acme", "research"),)), ACME_ADS, None),
    ("strike-ended", MemberState(strikes=(_strike("acme", end_ms=NOW - 1),)), ACME_ADS, None),
    ("strike-not-started", MemberState(strikes=(_strike("acme", start_ms=NOW + 1),)), ACME_ADS, None),
    ("strike-withdrawn", MemberState(strikes=(_strike("acme", withdrawn_ms=NOW - 1),)), ACME_ADS, None),
    (
        "paused-and-striking",
        MemberState(paused_ms=NOW, strikes=(_strike("acme"),)),
        ACME_ADS,
        DeclineReason.MEMBER_PAUSED,
    ),
]


@pytest.mark.parametrize(("state", "job", "reason"), [d[1:] for d in DECISIONS], ids=[d[0] for d in DECISIONS])
def test_invitation_times_state_decides_run_or_decline(
    state: MemberState | None, job: tuple[str, str], reason: DeclineReason | None
) -> None:
    decision = decide(state, *job, NOW)
    assert (decision.run, decision.reason) == (reason is None, reason)
    if reason is DeclineReason.MEMBER_STRIKING:
        assert state is not None and decision.strike == state.strikes[0]
        assert str(decision) == f"member_striking ({state.strikes[0].target_text()})"


@pytest.mark.parametrize(
    ("state", "training", "status"),
    [
        (MemberState(), False, DeviceStatus.IDLE),
        (MemberState(), True, DeviceStatus.TRAINING),
        (MemberState(paused_ms=NOW), False, DeviceStatus.PAUSED),
        (None, False, DeviceStatus.PAUSED),
        (MemberState(strikes=(_strike(),)), False, DeviceStatus.STRIKING),
        (MemberState(strikes=(_strike(end_ms=NOW - 1),)), False, DeviceStatus.IDLE),
        (MemberState(paused_ms=NOW, strikes=(_strike(),)), False, DeviceStatus.PAUSED),
        (MemberState(left_ms=NOW), False, DeviceStatus.LEFT),
        (MemberState(left_ms=NOW, paused_ms=NOW), True, DeviceStatus.LEFT),
    ],
)
def test_heartbeat_status(state: MemberState | None, training: bool, status: DeviceStatus) -> None:
    assert heartbeat_status(state, NOW, training) == status


def test_votes_owed_and_their_signed_messages() -> None:
    voted, withdrawn, never_sent, ended = (
        _strike("acme"),
        _strike("globex", withdrawn_ms=NOW),
        _strike("initech", withdrawn_ms=NOW),
        _strike(None, "ads", end_ms=NOW - 1),
    )
    state = MemberState(strikes=(voted, withdrawn, never_sent, ended))
    held = {vote_name(voted.id, False), vote_name(withdrawn.id, False)}
    owed = owed_votes(state, held.__contains__)
    assert [(o.strike.id, o.withdraw) for o in owed] == [(withdrawn.id, True), (ended.id, False)]
    held |= {o.name for o in owed}
    assert owed_votes(state, held.__contains__) == []  # once queued, never again
    assert owed_votes(None, held.__contains__) == []

    key = SignerKey.generate("d-test")
    envelope = strike_vote(owed[0], 9, NOW).seal(key)
    vote = decode(open_envelope(envelope, {key.key_id.hex(): key.verifier}, StrikeVote.PAYLOAD_TYPE), StrikeVote)
    # The withdrawal names the same target and start as the vote, and ends the span when it was withdrawn.
    assert (vote.withdraw, vote.target_buyer, vote.start_ms, vote.end_ms, vote.seq) == (
        True,
        "globex",
        withdrawn.start_ms,
        NOW,
        9,
    )
    ended_vote = strike_vote(OwedVote("x", ended, False), 10, NOW)
    assert (ended_vote.withdraw, ended_vote.target_purpose, ended_vote.end_ms) == (False, "ads", NOW - 1)


# --- the daemon's view: polls the file, keeps the last good state ----------------------------------------------------


def test_controls_pick_up_changes_and_refuse_a_bad_file_without_changing(tmp_path: Path) -> None:
    controls = MemberControls(tmp_path, "riverside")
    assert controls.state == MemberState() and controls.poll() is None  # nothing changed
    save_member_state(tmp_path, pause(MemberState(), NOW))
    reading = controls.poll()
    assert reading is not None and controls.apply(reading) and controls.state is not None
    assert controls.state.paused_ms == NOW
    assert not controls.admit("acme", "ads").run and controls.declined == {DeclineReason.MEMBER_PAUSED: 1}

    (tmp_path / MEMBER_FILE).write_bytes(b"\x00garbage")
    reading = controls.poll()
    assert reading is not None and not controls.apply(reading)
    assert controls.file_errors == 1 and controls.state.paused_ms == NOW  # the last good state holds

    bad_from_start = MemberControls(tmp_path, "riverside")
    assert bad_from_start.state is None and bad_from_start.file_errors == 1
    assert bad_from_start.admit("acme", "ads").reason is DeclineReason.STATE_UNREADABLE
    assert bad_from_start.heartbeat_status(training=False) is DeviceStatus.PAUSED


def _membership(tmp_path: Path) -> tuple[Membership, SignerKey]:
    mid_key = SignerKey.generate("riverside")
    record = MembershipRecord(
        mid="riverside",
        device="d-1",
        member="ann",
        mid_key=mid_key.verifier.text(),
        enrolment_url="http://127.0.0.1:1",
        broker=BrokerCredentials(host="127.0.0.1", port=1, username="d-1", password="x" * 16, tls=False),
        enrolled_ms=NOW,
        flower_node_id=5,
        superlink="127.0.0.1:1",
    )
    return Membership(tmp_path, record, SignerKey.generate("d-1")), mid_key


NO_STORE = WindowSource(Path("/nonexistent/samples.db"))


def test_job_node_declines_invitations_the_member_does_not_allow(tmp_path: Path) -> None:
    membership, mid_key = _membership(tmp_path)
    save_member_state(tmp_path, strike(MemberState(), time.time_ns() // 1_000_000 - 1, "acme", None)[0])
    controls = MemberControls(tmp_path, "riverside")
    # No sample store: an admitted invitation is declined for its data and starts nothing; one the member does not
    # allow is declined before its data is looked at.
    node = JobNode(membership, tmp_path / "spool", NO_STORE, admit=controls.admit, recheck=controls.recheck)

    async def invite() -> None:
        await node.invited(signed_invitation(mid_key, "job-1", 1))
        await node.invited(signed_invitation(mid_key, "job-2", 1, buyer="globex"))

    asyncio.run(invite())
    assert node.job is None and node.declined == 2 and controls.declined == {DeclineReason.MEMBER_STRIKING: 1}
    assert node.data_declines == {DeclineReason.NO_FITTING_DATA: 1}


def test_a_spooled_record_carries_the_nonce_of_its_own_runs_invitation(tmp_path: Path) -> None:
    """A record of an earlier job still in the spool when a later job's invitation arrives is signed with its own
    job's nonce (ingest refuses any other: wrong_round_nonce); a run no invitation named is refused, not guessed."""
    membership, mid_key = _membership(tmp_path)
    controls = MemberControls(tmp_path, "riverside")
    node = JobNode(membership, tmp_path / "spool", NO_STORE, admit=controls.admit, recheck=controls.recheck)
    first, second = "a" * 32, "b" * 32

    async def invite() -> None:
        await node.invited(signed_invitation(mid_key, "job-1", 0, nonce=first))  # before the run
        await node.invited(signed_invitation(mid_key, "job-1", 7, nonce=first))  # renewal
        await node.invited(signed_invitation(mid_key, "job-2", 9, nonce=second))

    asyncio.run(invite())
    spool = tmp_path / "spool"
    assert read_record(write_body(spool, contribution_body(0, run_id=7)), node.nonce_for).round_nonce == first
    assert read_record(write_body(spool, contribution_body(0, run_id=9)), node.nonce_for).round_nonce == second
    with pytest.raises(MalformedError, match="no job invitation"):  # no job started here, so no latest nonce either
        read_record(write_body(spool, contribution_body(0, run_id=8)), node.nonce_for)

    # An agent restarted with bodies still in the spool signs them as the one that took the invitations would.
    again = JobNode(membership, spool, NO_STORE, admit=controls.admit, recheck=controls.recheck)
    assert (again.nonce_for(7), again.nonce_for(9), again.nonce_for(8)) == (first, second, None)
    assert (tmp_path / NONCES_FILE).stat().st_mode & 0o077 == 0


def test_unreadable_invitation_nonces_cost_the_nonces_not_the_agent(tmp_path: Path) -> None:
    membership, _ = _membership(tmp_path)
    for damaged in (b"\x00garbage", b'{"latest": null, "runs": {"07": "' + b"a" * 32 + b'"}}'):
        (tmp_path / NONCES_FILE).write_bytes(damaged)
        node = JobNode(membership, tmp_path / "spool", NO_STORE)
        assert node.nonce_for(7) is None and node.round_nonce is None


# --- the commands ---------------------------------------------------------------------------------------------------


def _agent(tmp_path: Path, *mids: str) -> Path:
    for mid in mids:
        (tmp_path / "data" / "mids" / mid).mkdir(parents=True)
        (tmp_path / "data" / "mids" / mid / "membership.json").write_text("{}")
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    return config


def _member(tmp_path: Path, mid: str) -> MemberState:
    return load_member_state(tmp_path / "data" / "mids" / mid)


def test_commands_apply_per_mid_or_to_every_membership(tmp_path: Path) -> None:
    config = _agent(tmp_path, "riverside", "hillside")
    run = CliRunner().invoke
    assert run(app, ["agent", "pause", "--mid", "riverside", "--config", str(config)]).exit_code == 0
    assert _member(tmp_path, "riverside").paused_ms is not None and _member(tmp_path, "hillside") == MemberState()
    struck = run(app, ["agent", "strike", "--buyer", "acme", "--until", "2100-01-01", "--config", str(config)])
    assert struck.exit_code == 0, struck.output
    for mid in ("riverside", "hillside"):
        (only,) = _member(tmp_path, mid).strikes
        assert only.target_buyer == "acme" and only.end_ms == parse_until("2100-01-01T00:00:00+00:00")
    shown = run(app, ["agent", "status", "--config", str(config)])
    assert shown.exit_code == 0 and all(word in shown.output for word in ("riverside", "hillside", "acme", "paused"))

    unknown = run(app, ["agent", "pause", "--mid", "lakeside", "--config", str(config)])
    assert unknown.exit_code == 2 and "hillside, riverside" in unknown.output
    assert run(app, ["agent", "leave", "--mid", "hillside", "--config", str(config)], input="n\n").exit_code == 1
    assert _member(tmp_path, "hillside").left_ms is None  # not confirmed: nothing changed
    assert run(app, ["agent", "leave", "--mid", "hillside", "--yes", "--config", str(config)]).exit_code == 0
    refused = run(app, ["agent", "resume", "--config", str(config)])
    assert refused.exit_code == 1 and "already_left" in refused.output
    assert _member(tmp_path, "riverside").paused_ms is None  # the other membership still resumed


def test_a_command_on_a_corrupt_file_fails_clearly_and_changes_nothing(tmp_path: Path) -> None:
    config = _agent(tmp_path, "riverside")
    path = tmp_path / "data" / "mids" / "riverside" / MEMBER_FILE
    path.write_bytes(b'{"v": 1, "paused_ms": null, "left_ms": 17')
    result = CliRunner().invoke(app, ["agent", "pause", "--config", str(config)])
    assert result.exit_code == 1 and "malformed" in result.output and str(path) in result.output.replace("\n", "")
    assert path.read_bytes() == b'{"v": 1, "paused_ms": null, "left_ms": 17'


def test_status_reads_where_each_vote_is_from_the_outbox(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", 1 << 20)
    box.enqueue_many([("strike", lambda seq: b"v" * 10, "strike-aaaaaaaaaaaaaaaa-vote")] * 1, NOW)
    box.enqueue_many([("strike", lambda seq: b"w" * 10, "strike-bbbbbbbbbbbbbbbb-vote")], NOW)
    box.enqueue_many([("strike", lambda seq: b"x" * 10, "strike-dddddddddddddddd-vote")], NOW)
    box.settle([SettledReport(2, 40, 41, "00" * 32)], NOW)
    assert box.refuse(3, hashlib.sha256(b"x" * 10).hexdigest(), "malformed", "", NOW)
    box.close()
    names = [f"strike-{c * 16}-vote" for c in "abcd"]
    found = {name: str(state) for name, state in vote_states(tmp_path / "outbox.sqlite", names).items()}
    assert found == {
        names[0]: "queued (seq 1)",
        names[1]: "receipted (seq 2, leaf 40)",
        names[2]: "not queued yet",
        names[3]: "refused by the MID: malformed (seq 3)",
    }
