"""The member's own choices for one membership -- paused, left, on strike -- as durable state on the device.

`{data_dir}/mids/{mid}/member.json` (0600), written only by the member commands (`midgate agent pause|resume|leave|
strike|unstrike`), read by the running daemon (edge.agent.controls.watch). It lives on the device and not in the
daemon's memory because a member who paused must stay paused across a reboot, and the commands work whether the
daemon runs or not. Writes replace the file atomically (temporary file, fsync, rename, fsync of the folder) under an
advisory lock (`member.lock`), so a reader never sees half a file and two commands at once cannot lose an update.

The transitions are pure functions `state -> state`; a refused one raises MemberControlError and changes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from edge.durable_file import replace_file
from protocol.errors import ReasonedError
from protocol.messages import Ident, TaskSensors, TimeMs, check_strike_span, strike_covers
from protocol.private_files import private_dir

MEMBER_FILE = "member.json"
LOCK_FILE = "member.lock"
MAX_MEMBER_FILE = 64 * 1024
MAX_STRIKES = 256
StrikeId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class ControlReason(StrEnum):
    """Why a member command or the member file was refused; local to the device, not part of the wire protocol."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNREADABLE = "unreadable"
    ALREADY_LEFT = "already_left"
    NO_TARGET = "no_target"
    BAD_SPAN = "bad_span"
    NO_SUCH_STRIKE = "no_such_strike"
    TOO_MANY_STRIKES = "too_many_strikes"
    BAD_KNOB = "bad_knob"
    NO_PURPOSE_LIST = "no_purpose_list"
    NO_SENSOR_LIST = "no_sensor_list"


class MemberControlError(ReasonedError):
    """A refused member command or an unusable member file; `details` name what was expected and what was found."""

    reason: ControlReason

    def __init__(self, reason: ControlReason, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.reason = reason


class Strike(BaseModel):
    """One strike of this member: against a buyer, a purpose, or a buyer for one purpose, from `start_ms` to `end_ms`
    (None: until withdrawn). Its StrikeVote is signed by the daemon, which names it `strike-{id}-vote` in the outbox."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: StrikeId
    target_buyer: Ident | None = None
    target_purpose: Ident | None = None
    start_ms: TimeMs
    end_ms: TimeMs | None = None
    withdrawn_ms: TimeMs | None = None

    @model_validator(mode="after")
    def _target_and_span(self) -> Self:
        check_strike_span(self.target_buyer, self.target_purpose, self.start_ms, self.end_ms)
        return self

    def active(self, now_ms: int) -> bool:
        """Started, not ended, not withdrawn."""
        if self.withdrawn_ms is not None or now_ms < self.start_ms:
            return False
        return self.end_ms is None or now_ms < self.end_ms

    def covers(self, buyer: str, purpose: str) -> bool:
        """True when a job for `buyer` and `purpose` is one this strike is against."""
        return strike_covers(self.target_buyer, self.target_purpose, buyer, purpose)

    def target_text(self) -> str:
        """`buyer acme`, `purpose ads` or `buyer acme, purpose ads`."""
        named = [("buyer", self.target_buyer), ("purpose", self.target_purpose)]
        return ", ".join(f"{what} {value}" for what, value in named if value is not None)


class MemberState(BaseModel):
    """Everything the member chose for one membership. The default (no file yet) is: taking part, no strikes."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: Literal[1] = 1
    paused_ms: TimeMs | None = None
    """Since when the member pauses; None: not paused."""
    left_ms: TimeMs | None = None
    """When the member left this MID; final. None: still a member."""
    strikes: Annotated[tuple[Strike, ...], Field(max_length=MAX_STRIKES)] = ()
    changed_ms: int = 0
    knob_milli: Annotated[int, Field(ge=-1000, le=1000)] | None = None
    """The member's price knob in milli-units (None: never set, the MID's default)."""
    knob_ms: TimeMs | None = None
    """When the knob was last set: names its signed KnobUpdate (`knob-{knob_ms}` in the outbox)."""
    allowed_purposes: Annotated[tuple[Ident, ...], Field(max_length=64)] | None = None
    """Purposes the member allows (None: every purpose of the MID's vocabulary)."""
    denied_buyers: Annotated[tuple[Ident, ...], Field(max_length=256)] = ()
    consent_ms: TimeMs | None = None
    """When the consent was last changed: names its signed ConsentPolicy (`consent-{consent_ms}`)."""
    task_sensors: Annotated[tuple[TaskSensors, ...], Field(max_length=64)] = ()
    """Per task (by id), the kinds of sensor the member lets it train on; a task not listed may use every sensor."""

    def active_strikes(self, now_ms: int) -> list[Strike]:
        return [s for s in self.strikes if s.active(now_ms)]


# --- the file ------------------------------------------------------------------------------------------------------


def load_member_state(directory: Path) -> MemberState:
    """The state in `directory/member.json`; the default when there is none. Raises MemberControlError
    (too_large, unreadable, malformed) for a file that cannot be trusted; the file is left as it is."""
    path = directory / MEMBER_FILE
    try:
        with path.open("rb") as f:
            data = f.read(MAX_MEMBER_FILE + 1)
    except FileNotFoundError:
        return MemberState()
    except OSError as exc:
        raise MemberControlError(
            ControlReason.UNREADABLE, "member file cannot be read", path=str(path), error=str(exc)
        ) from None
    if len(data) > MAX_MEMBER_FILE:
        raise MemberControlError(
            ControlReason.TOO_LARGE, "member file too large", path=str(path), limit=MAX_MEMBER_FILE, found=len(data)
        )
    try:
        return MemberState.model_validate_json(data)
    except ValidationError as exc:
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in exc.errors()[:3])
        raise MemberControlError(
            ControlReason.MALFORMED, "member file does not match its schema", path=str(path), found=detail
        ) from None


def save_member_state(directory: Path, state: MemberState) -> None:
    """Replace `directory/member.json` atomically with `state`, 0600, durable before it returns."""
    replace_file(directory / MEMBER_FILE, state.model_dump_json(indent=2).encode() + b"\n")


@contextlib.contextmanager
def editing(directory: Path) -> Iterator[MemberState]:
    """Hold the member file's lock and yield its current state: read-modify-write by two commands at once is
    serialised (flock, released with the process even if it dies)."""
    private_dir(directory)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield load_member_state(directory)
    finally:
        os.close(fd)


# --- the member's commands as pure transitions ------------------------------------------------------------------------


def _still_member(state: MemberState, command: str) -> None:
    if state.left_ms is not None:
        raise MemberControlError(
            ControlReason.ALREADY_LEFT, f"cannot {command}: this membership was left", left_ms=state.left_ms
        )


def pause(state: MemberState, now_ms: int) -> MemberState:
    """Stop taking part in jobs until `resume`. Pausing twice keeps the first time."""
    _still_member(state, "pause")
    if state.paused_ms is not None:
        return state
    return state.model_copy(update={"paused_ms": now_ms, "changed_ms": now_ms})


def resume(state: MemberState, now_ms: int) -> MemberState:
    """Take part in jobs again (strikes stay as they are)."""
    _still_member(state, "resume")
    if state.paused_ms is None:
        return state
    return state.model_copy(update={"paused_ms": None, "changed_ms": now_ms})


def leave(state: MemberState, now_ms: int) -> MemberState:
    """Leave the MID for good: no more jobs; what the outbox holds is still delivered, so past work is paid."""
    if state.left_ms is not None:
        return state
    return state.model_copy(update={"left_ms": now_ms, "changed_ms": now_ms})


def strike(
    state: MemberState,
    now_ms: int,
    buyer: str | None,
    purpose: str | None,
    end_ms: int | None = None,
    strike_id: str | None = None,
) -> tuple[MemberState, Strike]:
    """Join a strike from now against `buyer` and/or `purpose` until `end_ms` (None: until withdrawn).

    An active strike with the same target is returned as is (striking twice is one strike).
    """
    _still_member(state, "strike")
    if buyer is None and purpose is None:
        raise MemberControlError(ControlReason.NO_TARGET, "a strike needs --buyer, --purpose, or both")
    if end_ms is not None and end_ms <= now_ms:
        raise MemberControlError(ControlReason.BAD_SPAN, "a strike must end in the future", now_ms=now_ms, found=end_ms)
    for existing in state.active_strikes(now_ms):
        if (existing.target_buyer, existing.target_purpose) == (buyer, purpose):
            return state, existing
    if len(state.strikes) >= MAX_STRIKES:
        raise MemberControlError(ControlReason.TOO_MANY_STRIKES, "too many strikes kept", limit=MAX_STRIKES)
    try:
        new = Strike(
            id=strike_id or secrets.token_hex(8),
            target_buyer=buyer,
            target_purpose=purpose,
            start_ms=now_ms,
            end_ms=end_ms,
        )
    except ValidationError as exc:
        raise MemberControlError(
            ControlReason.MALFORMED, "not a valid strike", found=exc.errors()[0]["msg"], buyer=buyer, purpose=purpose
        ) from None
    return state.model_copy(update={"strikes": (*state.strikes, new), "changed_ms": now_ms}), new


def unstrike(
    state: MemberState, now_ms: int, buyer: str | None = None, purpose: str | None = None
) -> tuple[MemberState, list[Strike]]:
    """Withdraw every active strike whose target matches (`buyer`/`purpose` None: any); returns the withdrawn ones.

    Raises no_such_strike when nothing matches, already_left after leaving: the MID revokes a departed member's key
    and no longer counts its votes, so a withdrawal could neither be logged nor change anything.
    """
    _still_member(state, "withdraw a strike")
    hits = [
        s
        for s in state.active_strikes(now_ms)
        if (buyer is None or s.target_buyer == buyer) and (purpose is None or s.target_purpose == purpose)
    ]
    if not hits:
        raise MemberControlError(ControlReason.NO_SUCH_STRIKE, "no active strike matches", buyer=buyer, purpose=purpose)
    ids = {s.id for s in hits}
    strikes = tuple(s.model_copy(update={"withdrawn_ms": now_ms}) if s.id in ids else s for s in state.strikes)
    return state.model_copy(update={"strikes": strikes, "changed_ms": now_ms}), hits


def set_knob(state: MemberState, now_ms: int, knob_milli: int) -> MemberState:
    """Set the price knob (milli-units in [-1000, 1000]); the daemon signs a KnobUpdate for the MID."""
    _still_member(state, "set the knob")
    if isinstance(knob_milli, bool) or not -1000 <= knob_milli <= 1000:
        raise MemberControlError(ControlReason.BAD_KNOB, "the knob is in [-1, 1]", found=knob_milli / 1000)
    if state.knob_milli == knob_milli:
        return state
    return state.model_copy(update={"knob_milli": knob_milli, "knob_ms": now_ms, "changed_ms": now_ms})


def _consent(
    state: MemberState,
    now_ms: int,
    allowed: tuple[str, ...] | None,
    denied: tuple[str, ...],
    task_sensors: tuple[TaskSensors, ...] | None = None,
) -> MemberState:
    sensors = state.task_sensors if task_sensors is None else task_sensors
    if (allowed, denied, sensors) == (state.allowed_purposes, state.denied_buyers, state.task_sensors):
        return state
    try:
        return MemberState.model_validate(
            {
                **state.model_dump(),
                "allowed_purposes": allowed,
                "denied_buyers": denied,
                "task_sensors": tuple(sensors),
                "consent_ms": now_ms,
                "changed_ms": now_ms,
            }
        )
    except ValidationError as exc:
        raise MemberControlError(ControlReason.MALFORMED, "not a valid consent", found=exc.errors()[0]["msg"]) from None


def allow(state: MemberState, now_ms: int, purposes: list[str], buyers: list[str]) -> MemberState:
    """Allow `purposes` (the first allow turns "every purpose" into "only the purposes allowed") and stop denying
    `buyers`. Applies from the next job: a running one is not stopped by a consent change."""
    _still_member(state, "change consent")
    allowed = state.allowed_purposes
    if purposes:
        allowed = tuple(dict.fromkeys((*(allowed or ()), *purposes)))
    denied = tuple(b for b in state.denied_buyers if b not in buyers)
    return _consent(state, now_ms, allowed, denied)


def deny(state: MemberState, now_ms: int, purposes: list[str], buyers: list[str]) -> MemberState:
    """Deny `buyers` and withdraw `purposes` from the allowed ones. Withdrawing a purpose needs a list of allowed
    purposes first (the device does not know the MID's whole vocabulary), so "every purpose" refuses it."""
    _still_member(state, "change consent")
    allowed = state.allowed_purposes
    if purposes:
        if allowed is None:
            raise MemberControlError(
                ControlReason.NO_PURPOSE_LIST,
                "every purpose is allowed: say which ones you allow first (`consent allow --purpose ...`)",
                purposes=purposes,
            )
        allowed = tuple(p for p in allowed if p not in purposes)
    denied = tuple(dict.fromkeys((*state.denied_buyers, *buyers)))
    return _consent(state, now_ms, allowed, denied)


def allow_every_purpose(state: MemberState, now_ms: int) -> MemberState:
    """Back to the default: every purpose of the MID's vocabulary (denied buyers stay denied)."""
    _still_member(state, "change consent")
    return _consent(state, now_ms, None, state.denied_buyers)


def _with_task_sensors(state: MemberState, task_id: str, sensors: tuple[str, ...] | None) -> tuple[TaskSensors, ...]:
    """The member's sensors per task with `task_id`'s entry replaced by `sensors` (None: removed), sorted by task."""
    try:
        kept = [t for t in state.task_sensors if t.task_id != task_id]
        if sensors is not None:
            kept.append(TaskSensors(task_id=task_id, sensors=tuple(sorted(set(sensors)))))
    except ValidationError as exc:
        raise MemberControlError(
            ControlReason.MALFORMED, "not a task id and sensor kinds", found=exc.errors()[0]["msg"], task=task_id
        ) from None
    return tuple(sorted(kept, key=lambda t: t.task_id))


def _sensors_of(state: MemberState, task_id: str) -> tuple[str, ...] | None:
    return next((t.sensors for t in state.task_sensors if t.task_id == task_id), None)


def allow_sensors(state: MemberState, now_ms: int, task_id: str, sensors: list[str]) -> MemberState:
    """Let task `task_id` train on these kinds of sensor (the first allow turns "every sensor" into "only the sensors
    allowed"). Applies from the next job: a running one keeps the windows it was given."""
    _still_member(state, "change consent")
    given = _sensors_of(state, task_id) or ()
    updated = _with_task_sensors(state, task_id, (*given, *sensors))
    return _consent(state, now_ms, state.allowed_purposes, state.denied_buyers, updated)


def deny_sensors(state: MemberState, now_ms: int, task_id: str, sensors: list[str]) -> MemberState:
    """Stop task `task_id` training on these kinds of sensor. With every sensor allowed (the default) there is no
    list to take them from, so it is refused: say which ones the task may use first."""
    _still_member(state, "change consent")
    given = _sensors_of(state, task_id)
    if given is None:
        raise MemberControlError(
            ControlReason.NO_SENSOR_LIST,
            f"task {task_id} may use every sensor: say which ones it may use first (`consent allow-sensor`)",
            task=task_id,
        )
    updated = _with_task_sensors(state, task_id, tuple(s for s in given if s not in sensors))
    return _consent(state, now_ms, state.allowed_purposes, state.denied_buyers, updated)


def every_sensor(state: MemberState, now_ms: int, task_id: str) -> MemberState:
    """Back to the default for task `task_id`: every sensor whose data fits its inputs."""
    _still_member(state, "change consent")
    updated = _with_task_sensors(state, task_id, None)
    return _consent(state, now_ms, state.allowed_purposes, state.denied_buyers, updated)
