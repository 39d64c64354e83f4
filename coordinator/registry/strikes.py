"""Strikes the MID honours: at quorum, no new job for the target.

Each member's StrikeVotes are ledger leaves (coordinator/registry/presence.py keeps them); a member strikes against a
target while one of its votes covering the target is in force. A target is a buyer, a purpose, or a buyer for one
purpose; a vote covers a target when each thing the vote names is what the target names (a strike against buyer
acme covers "acme for ads" too). The strike against a target is in force while the members striking against it are
at least the quorum: `quorum_bps` basis points of the MID's active members (those with a device key not revoked),
rounded up, and never fewer than `min_members` (both from the MID policy's `[strikes]`, coordinator/policy). Votes
of members who left (their keys are revoked) no longer count; each member counts once whatever number of its
devices voted. The strike ends by the same rule: withdrawals (or the votes' `end_ms`) bring the count under the
quorum.

`strike_refusal` is the one question job start and quotes ask: is a job of this buyer for this purpose refused, and
why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.registry.presence import StrikeVoteRecord, active_strikes
from coordinator.registry.store import Device, Registry
from protocol.errors import StrikeInForceError

BPS = 10_000


@dataclass(frozen=True)
class StrikeTarget:
    buyer: str | None
    purpose: str | None

    def text(self) -> str:
        named = [("buyer", self.buyer), ("purpose", self.purpose)]
        return ", ".join(f"{what} {value}" for what, value in named if value is not None)

    def covered_by(self, vote: StrikeVoteRecord) -> bool:
        return vote.target_buyer in (None, self.buyer) and vote.target_purpose in (None, self.purpose)


@dataclass(frozen=True)
class StrikeCount:
    target: StrikeTarget
    strikers: tuple[str, ...]
    """The members striking against the target now, sorted."""
    needed: int
    active_members: int

    @property
    def in_force(self) -> bool:
        return len(self.strikers) >= self.needed


def quorum_needed(active_members: int, quorum_bps: int, min_members: int = 1) -> int:
    """Members needed for a strike: ceil(active * quorum_bps / 10000), at least `min_members` (and at least 1).
    Requires 0 < quorum_bps <= 10000. With fewer active members than `min_members` no strike is ever in force."""
    return max(1, min_members, -(-active_members * quorum_bps // BPS))


class StrikeTally:
    """The strike votes in force at `now_ms` among the active members of `devices`."""

    def __init__(
        self,
        votes: Iterable[StrikeVoteRecord],
        devices: Iterable[Device],
        quorum_bps: int,
        now_ms: int,
        min_members: int = 1,
    ) -> None:
        members_by_device = {d.device_id: d.member_id for d in devices if not d.revoked}
        self.active_members = len(set(members_by_device.values()))
        self.needed = quorum_needed(self.active_members, quorum_bps, min_members)
        self._votes = [
            (members_by_device[device], vote)
            for device, votes in active_strikes(votes, now_ms).items()
            if device in members_by_device
            for vote in votes
        ]

    def count(self, target: StrikeTarget) -> StrikeCount:
        strikers = tuple(sorted({member for member, vote in self._votes if target.covered_by(vote)}))
        return StrikeCount(target, strikers, self.needed, self.active_members)

    def counted_votes(self, target: StrikeTarget) -> tuple[int, ...]:
        """Leaf indices of the votes in force, by active members, that cover `target` (ascending)."""
        return tuple(sorted({vote.leaf_index for _, vote in self._votes if target.covered_by(vote)}))

    def counts(self) -> list[StrikeCount]:
        """One count per target some member votes against now, most strikers first."""
        targets = {StrikeTarget(v.target_buyer, v.target_purpose) for _, v in self._votes}
        counts = [self.count(t) for t in targets]
        return sorted(counts, key=lambda c: (-len(c.strikers), c.target.buyer or "", c.target.purpose or ""))

    def refusal(self, buyer: str, purpose: str) -> str | None:
        """Why a new job of `buyer` for `purpose` is refused (a strike in force against it), or None."""
        count = self.count(StrikeTarget(buyer, purpose))
        if not count.in_force:
            return None
        targets = sorted(
            {
                StrikeTarget(v.target_buyer, v.target_purpose).text()
                for m, v in self._votes
                if StrikeTarget(buyer, purpose).covered_by(v)
            }
        )
        return (
            f"{len(count.strikers)} of {count.active_members} members strike against {'; '.join(targets)}"
            f" (quorum {count.needed})"
        )


def strike_refusal(
    registry: Registry, buyer: str, purpose: str, quorum_bps: int, now_ms: int, min_members: int = 1
) -> str | None:
    """Why the MID refuses a new job (or quote) of `buyer` for `purpose` with reason `strike`, or None when no strike
    in force covers it. `quorum_bps`, `min_members`: the policy in force's `[strikes]` (MidPolicy.strikes)."""
    tally = StrikeTally(registry.strike_votes(), registry.devices(), quorum_bps, now_ms, min_members)
    return tally.refusal(buyer, purpose)


def refuse_if_struck(
    registry: Registry, buyer: str, purpose: str, quorum_bps: int, now_ms: int, min_members: int = 1
) -> None:
    """`strike_refusal` as the buyer API raises it: StrikeInForceError (reason `strike`, HTTP 409) when a strike in
    force covers a job of `buyer` for `purpose`."""
    why = strike_refusal(registry, buyer, purpose, quorum_bps, now_ms, min_members)
    if why is not None:
        raise StrikeInForceError(why, buyer=buyer, purpose=purpose)


__all__ = ["StrikeCount", "StrikeTally", "StrikeTarget", "quorum_needed", "refuse_if_struck", "strike_refusal"]
