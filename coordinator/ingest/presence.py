"""What ingest heard of each device, kept where other processes can read it (coordinator/registry/presence.py).

Screening notes each heartbeat's status in memory (`Screener.note_status`) at the cost of a dict lookup; the
registry, which `coordinator devices` and `job start` read, gets it from `PresenceRecorder`: one transaction at the end
of a batch in which some device's status changed (a member paused, struck, left, or a device vanished), otherwise at
most one every PRESENCE_EVERY_S seconds with the devices heard from since, and nothing at all on a quiet MID. A
registry write is one fsync (synchronous=FULL), so heartbeats never cost one each. Strike votes are kept as they are
logged: `logged_strike_vote` turns a STRIKE leaf into the registry's record of it (the pipeline's commit writes them
before the dedup index, so a crash in between is caught up from the ledger at the next start).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from coordinator.registry.presence import Presence, StrikeVoteRecord
from coordinator.registry.store import Registry
from protocol.envelope import parse_unverified_payload, peek_envelope
from protocol.messages import DeviceStatus, StrikeVote

PRESENCE_EVERY_S = 5.0
"""Seconds between registry writes of last-seen times alone (status changes are written at the end of their batch).
Heartbeats come every minute by default and a device counts as offline after three minutes, so five seconds of lag
changes nobody's state."""


class HeardDevices(Protocol):
    """What screening heard (coordinator.ingest.pipeline.Screener)."""

    last_seen_ms: dict[str, int]
    statuses: dict[str, tuple[DeviceStatus, int]]
    statuses_changed: bool


class PresenceRecorder:
    """Writes `heard` to `registry`; `due()` on the event loop, `write()` in the thread that runs the pipeline (the
    batch loop awaits each in turn, so neither overlaps screening)."""

    def __init__(
        self,
        registry: Registry,
        heard: HeardDevices,
        every_s: float = PRESENCE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.heard = heard
        self.every_s = every_s
        self._clock = clock
        self._written: dict[str, tuple[DeviceStatus, int, int]] = {}
        self._last = clock()

    def due(self) -> bool:
        return self.heard.statuses_changed or self._clock() - self._last >= self.every_s

    def write(self) -> int:
        """Write every device whose status or last-seen time changed since the last write; returns how many."""
        self.heard.statuses_changed = False
        self._last = self._clock()
        changed: dict[str, tuple[DeviceStatus, int, int]] = {}
        for device, (status, since) in self.heard.statuses.items():
            row = (status, since, max(self.heard.last_seen_ms.get(device, since), since))
            if self._written.get(device) != row:
                changed[device] = row
        if changed:
            self.registry.record_presence(
                [
                    Presence(device, status, since, seen, status is DeviceStatus.OFFLINE)
                    for device, (status, since, seen) in changed.items()
                ]
            )
            self._written.update(changed)
        return len(changed)


def logged_strike_vote(leaf_index: int, device_id: str, envelope: bytes) -> StrikeVoteRecord:
    """The registry's record of a StrikeVote envelope logged at `leaf_index` (verified before it was logged)."""
    payload_type, payload, _ = peek_envelope(envelope)
    vote = parse_unverified_payload(payload_type, payload, StrikeVote)
    return StrikeVoteRecord(
        leaf_index, device_id, vote.target_buyer, vote.target_purpose, vote.start_ms, vote.end_ms, vote.withdraw
    )


__all__ = ["PRESENCE_EVERY_S", "HeardDevices", "PresenceRecorder", "logged_strike_vote"]
