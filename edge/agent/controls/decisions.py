"""What the member's choices mean for the daemon: pure functions of (member state, invitation, now).

- `decide`: run the SuperNode for a job the MID invites this device to, or decline it with a reason. Declining means
  the device never starts Flower for that job; the MID's strategy already drops nodes that stay silent.
- `heartbeat_status`: what the signed heartbeat says (`left` once the member left: the MID stops waiting for it).
- `owed_votes`: the StrikeVotes the member's strikes call for that the outbox does not hold yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from edge.agent.controls.state import MemberState, Strike
from protocol.messages import ConsentPolicy, DeviceStatus, KnobUpdate, LeaveNotice, StrikeVote, consent_excludes


class DeclineReason(StrEnum):
    """Why the agent does not run the SuperNode for a job (logged and counted per reason)."""

    MEMBER_LEFT = "member_left"
    MEMBER_PAUSED = "member_paused"
    MEMBER_STRIKING = "member_striking"
    CONSENT_EXCLUDES = "consent_excludes"
    """The member's consent does not allow the job's purpose, or denies its buyer."""
    STATE_UNREADABLE = "member_state_unreadable"
    """The member file could not be read when the daemon started: it takes part in nothing until the file is
    fixed, because it cannot know whether the member paused, left or struck."""
    UNKNOWN_TASK = "unknown_task"
    """Neither the MID nor the built-in tasks have the job's task."""
    TASK_SPEC_REFUSED = "task_spec_refused"
    """The MID's spec of the job's task is not signed by the MID's key, tampered with, malformed, outside the bounds
    or not of a vetted model family (edge.agent.job_task); nothing of it runs."""
    NO_FITTING_DATA = "no_fitting_data"
    """The sample store holds no data with the task's inputs: the channels in their units, from one of the inputs'
    sources, and class names for classification. Data of another origin is refused, never relabelled."""
    TOO_FEW_WINDOWS = "too_few_windows"
    """The store's fitting data gives fewer windows than `min_job_windows`."""


@dataclass(frozen=True)
class Decision:
    run: bool
    reason: DeclineReason | None = None
    strike: Strike | None = None
    """The strike that declined the job, for the log."""
    detail: str = ""
    """What the data lacked, for the log (data declines)."""

    def __str__(self) -> str:
        if self.run:
            return "run"
        if self.strike is not None:
            return f"{self.reason} ({self.strike.target_text()})"
        return f"{self.reason} ({self.detail})" if self.detail else str(self.reason)


RUN = Decision(run=True)


def decide(state: MemberState | None, buyer: str, purpose: str, now_ms: int) -> Decision:
    """Run or decline a job for `buyer` and `purpose`. `state` None: the member file is unreadable (decline)."""
    if state is None:
        return Decision(False, DeclineReason.STATE_UNREADABLE)
    if state.left_ms is not None:
        return Decision(False, DeclineReason.MEMBER_LEFT)
    if state.paused_ms is not None:
        return Decision(False, DeclineReason.MEMBER_PAUSED)
    for strike in state.active_strikes(now_ms):
        if strike.covers(buyer, purpose):
            return Decision(False, DeclineReason.MEMBER_STRIKING, strike)
    excluded = consent_excludes(state.allowed_purposes, state.denied_buyers, buyer, purpose)
    if excluded is not None:
        return Decision(False, DeclineReason.CONSENT_EXCLUDES, detail=excluded)
    return RUN


def heartbeat_status(state: MemberState | None, now_ms: int, training: bool) -> DeviceStatus:
    """The status a heartbeat carries. A member who left keeps saying so (`left`), signed, for as long as the agent
    runs to deliver its outbox: the MID then knows it will not come, rather than guessing from silence."""
    if state is None:
        return DeviceStatus.PAUSED
    if state.left_ms is not None:
        return DeviceStatus.LEFT
    if state.paused_ms is not None:
        return DeviceStatus.PAUSED
    if state.active_strikes(now_ms):
        return DeviceStatus.STRIKING
    return DeviceStatus.TRAINING if training else DeviceStatus.IDLE


def vote_name(strike_id: str, withdraw: bool) -> str:
    """The outbox's idempotency name of a strike's vote (the column that keeps spool files from being taken twice):
    one vote and at most one withdrawal per strike, whatever crashes or restarts happen between."""
    return f"strike-{strike_id}-{'withdraw' if withdraw else 'vote'}"


@dataclass(frozen=True)
class OwedVote:
    name: str
    strike: Strike
    withdraw: bool


def owed_votes(state: MemberState | None, known: Callable[[str], bool]) -> list[OwedVote]:
    """Votes the strikes call for that are not in the outbox yet (`known(name)`: the outbox holds or held it).

    A strike withdrawn before its vote ever left the device is not sent at all: the MID never needed to know.
    A strike that ended on its own needs no withdrawal: its vote carries `end_ms`.
    """
    if state is None:
        return []
    owed = []
    for strike in state.strikes:
        voted = known(vote_name(strike.id, False))
        if strike.withdrawn_ms is None:
            if not voted:
                owed.append(OwedVote(vote_name(strike.id, False), strike, False))
        elif voted and not known(vote_name(strike.id, True)):
            owed.append(OwedVote(vote_name(strike.id, True), strike, True))
    return owed


def strike_vote(owed: OwedVote, seq: int, now_ms: int) -> StrikeVote:
    """The signed message for an owed vote. A withdrawal names the same target and `start_ms` as the vote it
    withdraws (that is how the MID matches them) and ends the span at the withdrawal."""
    strike = owed.strike
    end_ms = strike.end_ms
    if owed.withdraw:
        assert strike.withdrawn_ms is not None
        stopped = max(strike.withdrawn_ms, strike.start_ms + 1)
        end_ms = stopped if end_ms is None else min(end_ms, stopped)
    return StrikeVote(
        seq=seq,
        device_time_ms=now_ms,
        target_buyer=strike.target_buyer,
        target_purpose=strike.target_purpose,
        start_ms=strike.start_ms,
        end_ms=end_ms,
        withdraw=owed.withdraw,
    )


# --- the member's other signed choices: leaving, the knob, consent ----------------------------------------------------

LEAVE_NAME = "leave"
"""The outbox name of the membership's one LeaveNotice."""


@dataclass(frozen=True)
class OwedChoice:
    """A signed message the member's choices call for: its up kind, outbox name and how to make it for a seq."""

    kind: str
    name: str
    make: Callable[[int, int], KnobUpdate | ConsentPolicy | LeaveNotice]
    """(seq, now_ms) -> the message."""


def owed_choices(state: MemberState | None, known: Callable[[str], bool], delivered: bool) -> list[OwedChoice]:
    """The KnobUpdate, ConsentPolicy and LeaveNotice the member's choices call for that the outbox does not hold yet.

    Only the latest knob and consent are sent (each names the time it was set, so a change made while the daemon was
    down is sent once it runs). The LeaveNotice waits until `delivered` (nothing left in the outbox or the spool):
    the MID revokes the device's key when it logs the notice, and what is still queued must reach it first."""
    if state is None:
        return []
    owed: list[OwedChoice] = []
    if state.left_ms is not None:
        left_ms = state.left_ms
        if delivered and not known(LEAVE_NAME):
            owed.append(
                OwedChoice(
                    "leave", LEAVE_NAME, lambda seq, now: LeaveNotice(seq=seq, device_time_ms=now, left_ms=left_ms)
                )
            )
        return owed
    if state.knob_milli is not None and state.knob_ms is not None and not known(f"knob-{state.knob_ms}"):
        knob = state.knob_milli
        owed.append(
            OwedChoice(
                "knob",
                f"knob-{state.knob_ms}",
                lambda seq, now: KnobUpdate(seq=seq, device_time_ms=now, bias_milli=knob),
            )
        )
    if state.consent_ms is not None and not known(f"consent-{state.consent_ms}"):
        allowed, denied, sensors = state.allowed_purposes, state.denied_buyers, state.task_sensors
        owed.append(
            OwedChoice(
                "consent",
                f"consent-{state.consent_ms}",
                lambda seq, now: ConsentPolicy(
                    seq=seq,
                    device_time_ms=now,
                    allowed_purposes=allowed or (),
                    denied_buyers=denied,
                    any_purpose=allowed is None,
                    task_sensors=sensors,
                ),
            )
        )
    return owed
