"""Values accumulated over a job's rounds, and the integer attribution vector that money is split by.

Round t (1-based) counts with weight decay**(t-1), as in lambda-MR (Wei et al., 2020): early rounds move the model
furthest, and a decay below 1 keeps late rounds (where every update looks alike) from dominating. decay = 1 is the
plain sum. The attribution vector is fixed-point (nano-units of validation-loss drop) so that everything downstream
of it, settlement and royalties, is integer arithmetic that anyone can recompute exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.attribution.valuation import RoundValuation
from protocol.errors import MalformedError

VALUE_SCALE = 1_000_000_000


def to_value_units(value: float) -> int:
    """A value in integer nano-units, rounded half to even (IEEE-deterministic)."""
    return round(value * VALUE_SCALE)


@dataclass
class AttributionAccount:
    """Running attribution of one job (or model version) across its rounds."""

    decay: float = 1.0
    totals: dict[str, float] = field(default_factory=dict)
    excluded_rounds: dict[str, int] = field(default_factory=dict)
    member_rounds: dict[str, int] = field(default_factory=dict)
    screens: dict[str, set[str]] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise MalformedError("decay must be in (0, 1]", decay=self.decay)

    def add(self, valuation: RoundValuation) -> None:
        """Add one round's values. Requires round indexes to be strictly increasing and >= 1."""
        if valuation.round_index < 1 or (self.rounds and valuation.round_index <= self.rounds[-1]):
            raise MalformedError(
                "rounds must be added once, in increasing order from 1",
                round_index=valuation.round_index,
                last=self.rounds[-1] if self.rounds else None,
            )
        weight = self.decay ** (valuation.round_index - 1)
        for member, value in valuation.values.items():
            self.totals[member] = self.totals.get(member, 0.0) + weight * value
            self.member_rounds[member] = self.member_rounds.get(member, 0) + 1
            self.excluded_rounds.setdefault(member, 0)
            self.screens.setdefault(member, set())
        for member, flags in valuation.flags.items():
            if any(flag.excludes for flag in flags):
                self.excluded_rounds[member] += 1
            self.screens[member].update(str(flag.reason) for flag in flags)
        self.rounds.append(valuation.round_index)

    def attribution_vector(self) -> dict[str, int]:
        """Accumulated values in nano-units, every member seen in any round included (negative values kept:
        settlement decides that they earn nothing, and the record shows why)."""
        return {member: to_value_units(total) for member, total in sorted(self.totals.items())}
