"""What members chose in signed, logged messages besides strikes: leaving, the price knob, consent.

Ingest keeps each as the ledger logged it (coordinator/ingest/member_records.py writes them into the registry): a
`Departure` per device a LeaveNotice revoked, the latest `KnobSetting` and the latest `ConsentRecord` per member.
Job start, quotes and `coordinator members` read them here; the rules they apply are the functions below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol.messages import TaskSensors, consent_excludes, consent_sensor_gap

DEFAULT_KNOB_MILLI = 0
"""The knob of a member who never set one: the policy's base price."""


@dataclass(frozen=True)
class Departure:
    """A device revoked because its member left: `leaf_index` is the member's logged LeaveNotice."""

    device_id: str
    member_id: str
    leaf_index: int
    left_ms: int


@dataclass(frozen=True)
class KnobSetting:
    member_id: str
    bias_milli: int
    leaf_index: int
    device_time_ms: int


@dataclass(frozen=True)
class ConsentRecord:
    """The member's latest ConsentPolicy: purposes allowed (None: the member never said, so every purpose of the
    MID's vocabulary) and buyers denied."""

    member_id: str
    allowed_purposes: tuple[str, ...] | None
    denied_buyers: tuple[str, ...]
    leaf_index: int
    task_sensors: tuple[TaskSensors, ...] = ()
    """Per task, the kinds of sensor the member lets it train on (a task not listed: every kind)."""

    def excludes(
        self, buyer: str, purpose: str, task_id: str | None = None, usable: tuple[str, ...] = ()
    ) -> str | None:
        """Why this consent rules out a job of `buyer` for `purpose` -- on task `task_id`, whose inputs take the
        sensor kinds `usable` (protocol.messages.usable_sensors), when given -- or None when it allows it."""
        why = consent_excludes(self.allowed_purposes, self.denied_buyers, buyer, purpose)
        if why is None and task_id is not None:
            why = consent_sensor_gap(self.task_sensors, task_id, usable)[1]
        return why


def knobs_for(members: list[str], settings: Mapping[str, KnobSetting]) -> dict[str, int]:
    """Member -> knob in milli-units for a quote: each member's latest logged knob, DEFAULT_KNOB_MILLI if none."""
    return {m: settings[m].bias_milli if m in settings else DEFAULT_KNOB_MILLI for m in members}


__all__ = ["DEFAULT_KNOB_MILLI", "ConsentRecord", "Departure", "KnobSetting", "knobs_for"]
