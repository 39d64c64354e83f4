"""Per-member reputation from attributed history and screen flags.

A beta reputation (Josang & Ismail, 2002): each valued round is evidence. A round where the member was admitted and
added positive value is good evidence; a round excluded by a screen counts `exclusion_weight` bad; a non-positive
value or a contradicted self-report counts one bad. Score = (good + 1) / (good + bad + 2), so a newcomer starts at
0.5 and a score only moves with evidence. Old evidence fades by `forgetting` per round, so a member can recover.
Scores are integer milli-units so that a job's minimum (`min_reputation_milli`) compares exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.attribution.screens import ScreenReason
from coordinator.attribution.valuation import RoundValuation
from protocol.errors import MalformedError, TooLargeError

MAX_SNAPSHOT_BYTES = 16 * 1024 * 1024


class _Evidence(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    good: float = Field(ge=0.0)
    bad: float = Field(ge=0.0)


class _Snapshot(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    forgetting: float = Field(gt=0.0, le=1.0)
    exclusion_weight: float = Field(ge=0.0)
    members: dict[str, _Evidence]


@dataclass
class ReputationBook:
    forgetting: float = 0.98
    exclusion_weight: float = 3.0
    good: dict[str, float] = field(default_factory=dict)
    bad: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.forgetting <= 1.0 or self.exclusion_weight < 0.0:
            raise MalformedError(
                "forgetting must be in (0, 1] and exclusion_weight >= 0",
                forgetting=self.forgetting,
                exclusion_weight=self.exclusion_weight,
            )

    def record(self, valuation: RoundValuation) -> None:
        """Take one valued round as evidence for every member in it."""
        for member, value in valuation.values.items():
            flags = valuation.flags.get(member, [])
            good = self.good.get(member, 0.0) * self.forgetting
            bad = self.bad.get(member, 0.0) * self.forgetting
            if any(flag.excludes for flag in flags):
                bad += self.exclusion_weight
            elif value > 0.0:
                good += 1.0
            else:
                bad += 1.0
            if any(flag.reason is ScreenReason.SELF_REPORT_MISMATCH for flag in flags):
                bad += 1.0
            self.good[member], self.bad[member] = good, bad

    def score_milli(self, member: str) -> int:
        """Reputation in [0, 1000]; 500 for a member with no history."""
        good = self.good.get(member, 0.0)
        bad = self.bad.get(member, 0.0)
        return round(1000 * (good + 1.0) / (good + bad + 2.0))

    def meets(self, member: str, min_reputation_milli: int) -> bool:
        """Whether the member may be selected for a job that requires `min_reputation_milli`."""
        return self.score_milli(member) >= min_reputation_milli

    def to_json(self) -> bytes:
        """The book's evidence, to persist between jobs."""
        members = {
            m: _Evidence(good=self.good.get(m, 0.0), bad=self.bad.get(m, 0.0))
            for m in sorted(set(self.good) | set(self.bad))
        }
        snapshot = _Snapshot(forgetting=self.forgetting, exclusion_weight=self.exclusion_weight, members=members)
        return snapshot.model_dump_json().encode()

    @classmethod
    def from_json(cls, data: bytes) -> ReputationBook:
        if len(data) > MAX_SNAPSHOT_BYTES:
            raise TooLargeError("reputation snapshot too large", size=len(data), limit=MAX_SNAPSHOT_BYTES)
        try:
            snapshot = _Snapshot.model_validate_json(data)
        except ValidationError as error:
            raise MalformedError("not a reputation snapshot", errors=error.error_count()) from None
        return cls(
            forgetting=snapshot.forgetting,
            exclusion_weight=snapshot.exclusion_weight,
            good={m: e.good for m, e in snapshot.members.items()},
            bad={m: e.bad for m, e in snapshot.members.items()},
        )
