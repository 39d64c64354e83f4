"""The running daemon's view of the member's choices for one membership (edge.agent.controls.state).

The member commands write `member.json` whether the daemon runs or not; the daemon notices a change by polling the
file's identity (inode, size, mtime: an atomic replace always changes the inode) every `member_poll_s` seconds on
its outbox thread, never on the event loop. A file that cannot be read or parsed is logged and counted and changes
nothing: the daemon keeps the last state it read, and when there is none (the file was already bad at start) it
declines every job and reports `paused`, since it cannot know what the member chose.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edge.agent.controls.decisions import Decision, DeclineReason, decide, heartbeat_status
from edge.agent.controls.state import MEMBER_FILE, MemberControlError, MemberState, load_member_state
from protocol.messages import DeviceStatus, consent_sensor_gap

log = logging.getLogger("midgate.agent.member")

_FileId = tuple[int, int, int] | None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _file_id(path: Path) -> _FileId:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def describe(state: MemberState | None, now_ms: int) -> str:
    """One line for logs and the status command: what the member chose for this membership."""
    if state is None:
        return "unknown (member file unreadable)"
    if state.left_ms is not None:
        return "left"
    parts = ["paused" if state.paused_ms is not None else "taking part"]
    parts += [f"striking against {s.target_text()}" for s in state.active_strikes(now_ms)]
    if state.knob_milli is not None:
        parts.append(f"knob {state.knob_milli / 1000:+.3f}")
    if state.allowed_purposes is not None:
        parts.append(f"purposes allowed: {', '.join(state.allowed_purposes) or 'none'}")
    if state.denied_buyers:
        parts.append(f"buyers denied: {', '.join(state.denied_buyers)}")
    for entry in state.task_sensors:
        parts.append(f"task {entry.task_id} may use: {', '.join(entry.sensors) or 'no sensor'}")
    return "; ".join(parts)


@dataclass(frozen=True)
class Reading:
    """What one poll found: a new state, or an error that changes nothing."""

    state: MemberState | None
    error: MemberControlError | None = None


class MemberControls:
    """Owned by one MembershipRunner. `poll` runs on the outbox thread; everything else on the event loop."""

    def __init__(self, directory: Path, mid: str) -> None:
        self.path = directory / MEMBER_FILE
        self.directory = directory
        self.mid = mid
        self.declined: Counter[str] = Counter()
        self.file_errors = 0
        self._seen: _FileId = None
        self.state: MemberState | None = None
        reading = self.poll()
        if reading is not None and reading.error is not None:
            self._refused(reading.error)
        else:
            self.state = reading.state if reading is not None else MemberState()
        log.info("member controls for %s: %s", mid, describe(self.state, _now_ms()))

    def poll(self) -> Reading | None:
        """Read the member file if it changed since the last poll; None when it did not. Blocking file I/O."""
        seen = _file_id(self.path)
        if seen == self._seen:
            return None
        self._seen = seen
        try:
            return Reading(load_member_state(self.directory))
        except MemberControlError as exc:
            return Reading(None, exc)

    def apply(self, reading: Reading) -> bool:
        """Take a poll's result; True when the member's choices changed."""
        if reading.error is not None:
            self._refused(reading.error)
            return False
        if reading.state == self.state:
            return False
        self.state = reading.state
        log.info("member controls changed for %s: %s", self.mid, describe(self.state, _now_ms()))
        return True

    def _refused(self, error: MemberControlError) -> None:
        self.file_errors += 1
        kept = "keeping the last state read" if self.state is not None else "declining every job until it is fixed"
        log.error("member file refused for %s, %s: %s", self.mid, kept, error)

    def admit(self, buyer: str, purpose: str) -> Decision:
        """Run or decline a job of `buyer` for `purpose` under the member's current choices; declines are counted."""
        decision = decide(self.state, buyer, purpose, _now_ms())
        if decision.reason is not None:
            self.declined[decision.reason] += 1
        return decision

    def recheck(self, buyer: str, purpose: str) -> Decision:
        """`admit` for a job already running, without counting: the question is whether to stop it."""
        return decide(self.state, buyer, purpose, _now_ms())

    def sensors_for(self, task_id: str, usable: tuple[str, ...]) -> tuple[tuple[str, ...] | None, str | None]:
        """The kinds of sensor the member lets task `task_id` use among `usable` (None: every one) and why it has
        none, under the choices read now: a change applies from the next job's windows."""
        if self.state is None:
            return (), "member file unreadable"
        return consent_sensor_gap(self.state.task_sensors, task_id, usable)

    def heartbeat_status(self, training: bool) -> DeviceStatus:
        return heartbeat_status(self.state, _now_ms(), training)

    @property
    def left(self) -> bool:
        return self.state is not None and self.state.left_ms is not None


__all__ = ["DeclineReason", "MemberControls", "Reading", "describe"]
