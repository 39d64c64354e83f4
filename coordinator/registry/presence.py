"""What devices said about themselves, as the MID last heard it, and who a job therefore need not wait for.

Members tell the MID when they will not take part: every signed heartbeat carries the member's status (idle,
training, paused, striking, left; `offline` is the broker's last will for a device that vanished), and every strike
is a signed StrikeVote in the ledger naming its target. `serve`'s ingest keeps both in the registry (`Presence`
rows written in batches, `StrikeVoteRecord` rows as the votes are logged: coordinator/ingest/presence.py), where
`coordinator devices` and `job start` read them from their own processes. `absence` is the one rule both apply.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from protocol.messages import DeviceStatus, strike_covers


@dataclass(frozen=True)
class Presence:
    """One device as the MID last heard it."""

    device_id: str
    status: DeviceStatus
    """The latest heartbeat's status; `offline` only for a device whose last will is all the MID ever heard."""
    status_ms: int
    """Since when the device has said `status`."""
    last_seen_ms: int
    """When the MID last heard from the device (a heartbeat, a report, its last will)."""
    offline: bool
    """The device's last will came after its latest heartbeat: it vanished without a goodbye."""

    def online(self, now_ms: int, offline_after_ms: int) -> bool:
        """Heard from within `offline_after_ms` (`[ingest] heartbeat_offline_s`) and not gone since."""
        return not self.offline and now_ms - self.last_seen_ms <= offline_after_ms


@dataclass(frozen=True)
class StrikeVoteRecord:
    """A StrikeVote (or its withdrawal) as the ledger logged it at `leaf_index`."""

    leaf_index: int
    device_id: str
    target_buyer: str | None
    target_purpose: str | None
    start_ms: int
    end_ms: int | None
    withdraw: bool

    def target_text(self) -> str:
        """`buyer acme`, `purpose ads` or `buyer acme, purpose ads` (as the agent says it)."""
        named = [("buyer", self.target_buyer), ("purpose", self.target_purpose)]
        return ", ".join(f"{what} {value}" for what, value in named if value is not None)


def active_strikes(votes: Iterable[StrikeVoteRecord], now_ms: int) -> dict[str, list[StrikeVoteRecord]]:
    """Device id -> the votes of its strikes in force at `now_ms`. A withdrawal names the same target and `start_ms`
    as the vote it withdraws and ends the span at the withdrawal (docs/member.md, "Strike votes"), so a strike is in
    force from `start_ms` until the earliest `end_ms` any of its votes names."""
    strikes: dict[tuple[str, str | None, str | None, int], list[StrikeVoteRecord]] = {}
    for vote in votes:
        strikes.setdefault((vote.device_id, vote.target_buyer, vote.target_purpose, vote.start_ms), []).append(vote)
    active: dict[str, list[StrikeVoteRecord]] = {}
    for (device, _, _, start_ms), spans in strikes.items():
        ends = [v.end_ms for v in spans if v.end_ms is not None]
        if start_ms <= now_ms and (not ends or now_ms < min(ends)):
            active.setdefault(device, []).append(min(spans, key=lambda v: v.leaf_index))
    return active


def absence(
    presence: Presence | None,
    strikes: list[StrikeVoteRecord],
    buyer: str,
    purpose: str,
    now_ms: int,
    offline_after_ms: int,
) -> str | None:
    """Why the device will not take part in a job of `buyer` for `purpose`, or None when it may. The member's own
    word comes first (left, paused, a strike against the job), then the MID's view of the device (offline, or never
    heard from since `serve` kept presence)."""
    covering = [s for s in strikes if strike_covers(s.target_buyer, s.target_purpose, buyer, purpose)]
    if presence is not None and presence.status is DeviceStatus.LEFT:
        return "left"
    if presence is not None and presence.status is DeviceStatus.PAUSED:
        return "paused"
    if covering:
        return "striking against " + "; ".join(s.target_text() for s in covering)
    if presence is None:
        return "offline: never heard from"
    if not presence.online(now_ms, offline_after_ms):
        return "offline: gone without a goodbye" if presence.offline else "offline: no heartbeat lately"
    return None


__all__ = ["Presence", "StrikeVoteRecord", "absence", "active_strikes"]
