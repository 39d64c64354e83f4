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
from protocol.messages import DeviceStatus, StrikeVote


class DeclineReason(StrEnum):
    """Why the agent does not run the SuperNode for a job (logged and counted per reason)."""

    MEMBER_LEFT = "member_left"
    MEMBER_PAUSED = "member_paused"
    MEMBER_STRIKING = "member_striking"
    STATE_UNREADABLE = "member_state_unreadable"
    """The member file could not be read when the daemon started: it takes part in nothing until the file is
    fixed, because it cannot know whether the member paused, left or struck."""
    UNKNOWN_TASK = "unknown_task"
    """The job's task is not one this agent knows how to cut windows for."""
    NO_FITTING_DATA = "no_fitting_data"
    """The sample store holds no data with the task's inputs (features, and class names for classification)."""
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
