"""Values accumulated over a job's rounds, and the integer attribution vector that money is split by.

Round t (1-based) counts with weight decay**(t-1), as in lambda-MR (Wei et al., 2020): early rounds move the model
furthest, and a decay below 1 keeps late rounds (where every update looks alike) from dominating. decay = 1 is the
plain sum. The attribution vector is fixed-point (nano-units of validation-loss drop) so that everything downstream
of it, settlement and royalties, is integer arithmetic that anyone can recompute exactly.

Same data is judged over the whole job as well as per round. One round's similarity of a same-data pair is noisy
(PLAID: 0.43-0.49 in a round between rounds of 0.6-0.8) and overlaps what members with different data reach in a
round (<= 0.47), but training noise is fresh every round while the shared data is not: a running sum of each round's
similarity above a reference (a CUSUM, screens.ScreenSettings.same_data_reference) grows for a same-data pair and
stays near 0 for others. A pair whose sum reaches `same_data_evidence` anywhere in the job is a job group, and at
settlement it is paid as one member in every round where its similarity is at least `same_data_persisting`, earlier
rounds included (round 1 has no previous round to carry a grouping) and later rounds too (diverging after the
evidence is in does not undo it). In such a round the pair was two players: it keeps the larger of its two values
(what one member with that data earned there), the excess taken from its positive values in proportion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coordinator.attribution.groups import union_groups
from coordinator.attribution.screens import ScreenReason, ScreenSettings
from coordinator.attribution.valuation import RoundValuation
from protocol.errors import MalformedError

VALUE_SCALE = 1_000_000_000

MemberPair = tuple[str, str]


def to_value_units(value: float) -> int:
    """A value in integer nano-units, rounded half to even (IEEE-deterministic)."""
    return round(value * VALUE_SCALE)


@dataclass(frozen=True)
class _RoundRecord:
    """What the job-level grouping needs of one valued round: its decay weight, values, players and evidence."""

    weight: float
    values: dict[str, float]
    players: list[tuple[str, ...]]
    similarities: dict[MemberPair, float]

    def admitted(self) -> set[str]:
        return {member for player in self.players for member in player}


def cusum_step(running: float, largest: float, similarity: float, reference: float) -> tuple[float, float]:
    """One round of a pair's evidence: the CUSUM max(0, S + similarity - reference) and the largest it reached."""
    running = max(0.0, running + similarity - reference)
    return running, max(largest, running)


@dataclass
class AttributionAccount:
    """Running attribution of one job (or model version) across its rounds. `totals` are the rounds' values as
    valued; `attribution_vector` settles them with the job's same-data groups (module docstring)."""

    decay: float = 1.0
    screen_settings: ScreenSettings = field(default_factory=ScreenSettings)
    totals: dict[str, float] = field(default_factory=dict)
    excluded_rounds: dict[str, int] = field(default_factory=dict)
    member_rounds: dict[str, int] = field(default_factory=dict)
    screens: dict[str, set[str]] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)
    _records: list[_RoundRecord] = field(default_factory=list)
    # Per pair with any evidence: (the running CUSUM, the largest it reached).
    _evidence: dict[MemberPair, tuple[float, float]] = field(default_factory=dict)

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
        record = _RoundRecord(weight, dict(valuation.values), list(valuation.players), dict(valuation.similarities))
        self._records.append(record)
        self._accumulate(record)

    def _accumulate(self, record: _RoundRecord) -> None:
        """Add one round to every pair's evidence; a round in which a pair was not both admitted leaves it as it
        is. A pair that becomes a job group carries the same-data screen from then on."""
        reference = self.screen_settings.same_data_reference
        if reference >= 1.0:
            return
        needed = self.screen_settings.same_data_evidence
        admitted = record.admitted()
        for pair in set(self._evidence) | set(record.similarities):
            if pair[0] in admitted and pair[1] in admitted:
                running, largest = self._evidence.get(pair, (0.0, 0.0))
                running, largest = cusum_step(running, largest, record.similarities.get(pair, 0.0), reference)
                if running > 0.0 or largest >= needed:
                    self._evidence[pair] = (running, largest)
                else:  # back where a pair without evidence starts: nothing to remember
                    self._evidence.pop(pair, None)
        for pair in self.job_pairs():
            for member in pair:
                self.screens[member].add(str(ScreenReason.SAME_DATA))

    def job_pairs(self) -> list[MemberPair]:
        """Pairs of members whose same-data evidence over the job's rounds so far reached `same_data_evidence`."""
        if self.screen_settings.same_data_reference >= 1.0:
            return []
        needed = self.screen_settings.same_data_evidence
        return sorted(pair for pair, (_, largest) in self._evidence.items() if largest >= needed)

    def paid_as_one(self) -> list[list[tuple[str, ...]]]:
        """Per valued round (in order), the sets of more than one member paid as one member: the round's groups,
        joined by the job's pairs whose similarity that round is at least `same_data_persisting`."""
        pairs = self.job_pairs()
        persisting = self.screen_settings.same_data_persisting
        paid = []
        for record in self._records:
            admitted = sorted(record.admitted())
            index = {member: i for i, member in enumerate(admitted)}
            links = [(index[player[0]], index[m]) for player in record.players for m in player[1:]]
            links += [
                (index[a], index[b])
                for a, b in pairs
                if a in index and b in index and record.similarities.get((a, b), 0.0) >= persisting
            ]
            components = union_groups(list(range(len(admitted))), links)
            paid.append([tuple(admitted[i] for i in c) for c in components if len(c) > 1])
        return paid

    def settled_totals(self) -> dict[str, float]:
        """Each member's accumulated value with the job's groups paid as one member (module docstring)."""
        totals = dict.fromkeys(self.totals, 0.0)
        for record, groups in zip(self._records, self.paid_as_one(), strict=True):
            values = dict(record.values)
            for group in groups:
                values.update(_one_member(group, record))
            for member, value in values.items():
                totals[member] += record.weight * value
        return totals

    def attribution_vector(self) -> dict[str, int]:
        """Settled values in nano-units, every member seen in any round included (negative values kept:
        settlement decides that they earn nothing, and the record shows why)."""
        return {member: to_value_units(total) for member, total in sorted(self.settled_totals().items())}


def _one_member(group: tuple[str, ...], record: _RoundRecord) -> dict[str, float]:
    """The values of a set of members paid as one member in a round: what the set earned above its most valuable
    player (a player of several members already weighs as one) is taken from its members valued above 0, in
    proportion to their values. Negative values stay: a member's value is never raised, and the set never earns more
    than it was valued."""
    inside = set(group)
    largest = max(sum(record.values[m] for m in player) for player in record.players if inside.intersection(player))
    values = {member: record.values[member] for member in group}
    excess = sum(values.values()) - largest
    positive = sum(v for v in values.values() if v > 0.0)
    if excess <= 0.0 or positive <= 0.0:
        return values
    keep = (positive - excess) / positive
    return {member: v * keep if v > 0.0 else v for member, v in values.items()}
