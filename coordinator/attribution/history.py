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
settlement it is paid as one member in every round where both were admitted and its similarity is at least
`same_data_linked` (0.3): earlier rounds included (round 1 has no previous round to carry a grouping), a round where
its similarity dipped (PLAID: a node holding 70 % of a member's data at 0.39 in one round of four, paid twice there
while only rounds at 0.42 were linked) and later rounds too (diverging after the evidence is in does not undo it).
In such a round the pair was two players: it keeps the smaller of its two values above 0, the excess taken from its
positive values in proportion. Keeping the larger (the rule before) paid a node holding 70 % of a member's data
1.38x its member at 50 PLAID members: valued as a player of its own before any evidence joined them, the part was
worth 3x the whole in that round. A value below 0 lowers nothing: it earns nothing anyway (docs/attribution.md,
section 7: what the smaller costs a member that a linked copy drags down).

The settlement itself is integer arithmetic (protocol/job_attribution.py) over exactly what the job's ROUND leaves
log: each round's values in nano-units and its same-data similarities in milli-units (the CUSUM adds milli-units).
So a member recomputes the JOB leaf's values from the ROUND leaves alone (`midgate ledger recompute-job`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from coordinator.attribution.screens import ScreenReason, ScreenSettings
from coordinator.attribution.valuation import RoundValuation
from protocol.errors import MalformedError
from protocol.job_attribution import (
    SAME_DATA_KEPT,
    Pair,
    SameDataEvidence,
    SameDataRules,
    ValuedRound,
    linked,
    paid_as_one,
    settled_round,
    similarity_milli,
)
from protocol.job_log import SameDataKept

VALUE_SCALE = 1_000_000_000


def to_value_units(value: float) -> int:
    """A value in integer nano-units, rounded half to even (IEEE-deterministic)."""
    return round(value * VALUE_SCALE)


def valued_round(valuation: RoundValuation) -> ValuedRound:
    """A round as its settlement reads it, and as the job's ROUND leaf logs it: values in nano-units, similarities
    in milli-units (protocol/job_attribution.py)."""
    return ValuedRound(
        round_index=valuation.round_index,
        values={member: to_value_units(value) for member, value in valuation.values.items()},
        players=list(valuation.players),
        similarities={pair: similarity_milli(s) for pair, s in valuation.similarities.items()},
    )


def same_data_rules(settings: ScreenSettings) -> SameDataRules:
    """The job-level grouping's thresholds of `settings` in milli-units."""
    return SameDataRules(
        reference_milli=similarity_milli(settings.same_data_reference),
        evidence_milli=similarity_milli(settings.same_data_evidence),
        linked_milli=similarity_milli(settings.same_data_linked),
    )


@dataclass
class AttributionAccount:
    """Running attribution of one job (or model version) across its rounds. `totals` are the rounds' values as
    valued; `attribution_vector` settles them with the job's same-data groups (module docstring), in integers."""

    decay: float = 1.0
    screen_settings: ScreenSettings = field(default_factory=ScreenSettings)
    totals: dict[str, float] = field(default_factory=dict)
    excluded_rounds: dict[str, int] = field(default_factory=dict)
    member_rounds: dict[str, int] = field(default_factory=dict)
    screens: dict[str, set[str]] = field(default_factory=dict)
    rounds: list[int] = field(default_factory=list)
    same_data_kept: SameDataKept = SAME_DATA_KEPT  # what the JOB leaf names; "larger" recomputes older jobs
    _valued: list[ValuedRound] = field(default_factory=list)
    _evidence: SameDataEvidence = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.decay <= 1.0:
            raise MalformedError("decay must be in (0, 1]", decay=self.decay)
        rules = replace(same_data_rules(self.screen_settings), kept=self.same_data_kept)
        self._evidence = SameDataEvidence(rules)
        for valued in self._valued:  # an account copied with other settings (dataclasses.replace) judges anew
            self._evidence.add(valued)

    def add(self, valuation: RoundValuation) -> None:
        """Add one round's values. Requires round indexes to be strictly increasing and >= 1."""
        if valuation.round_index < 1 or (self.rounds and valuation.round_index <= self.rounds[-1]):
            raise MalformedError(
                "rounds must be added once, in increasing order from 1",
                round_index=valuation.round_index,
                last=self.rounds[-1] if self.rounds else None,
            )
        weight = self._weight(valuation.round_index)
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
        valued = valued_round(valuation)
        self._valued.append(valued)
        self._evidence.add(valued)
        for pair in self.job_pairs():  # a job group carries the same-data screen from the round its evidence is in
            for member in pair:
                self.screens[member].add(str(ScreenReason.SAME_DATA))

    def _weight(self, round_index: int) -> float:
        return self.decay ** (round_index - 1)

    def job_pairs(self) -> list[Pair]:
        """Pairs of members whose same-data evidence over the job's rounds so far reached `same_data_evidence`."""
        return self._evidence.job_pairs()

    def job_groups(self) -> dict[Pair, list[int]]:
        """Each job pair and the valued rounds in which it was paid as one member (what the JOB leaf names)."""
        rules = self._evidence.rules
        return {pair: [v.round_index for v in self._valued if linked(pair, v, rules)] for pair in self.job_pairs()}

    def paid_as_one(self) -> list[list[tuple[str, ...]]]:
        """Per valued round (in order), the sets of more than one member paid as one member: the round's groups,
        joined by the job's pairs whose similarity that round is at least `same_data_persisting`."""
        pairs = self.job_pairs()
        return [paid_as_one(valued, pairs, self._evidence.rules) for valued in self._valued]

    def attribution_vector(self) -> dict[str, int]:
        """Settled values in nano-units, every member seen in any round included (negative values kept:
        settlement decides that they earn nothing, and the record shows why). Integer arithmetic over each round's
        values in nano-units (a round of decay weight w < 1 adds round(w * value)), so at decay 1 anyone recomputes
        it from the job's ROUND leaves (protocol.job_attribution.check_job_attribution)."""
        vector = dict.fromkeys(self.totals, 0)
        for valued, groups in zip(self._valued, self.paid_as_one(), strict=True):
            weight = self._weight(valued.round_index)
            for member, units in settled_round(valued, groups, self.same_data_kept).items():
                vector[member] += units if weight == 1.0 else round(weight * units)
        return dict(sorted(vector.items()))

    def settled_totals(self) -> dict[str, float]:
        """The attribution vector in units of validation-loss drop (for reading; money uses the vector)."""
        return {member: units / VALUE_SCALE for member, units in self.attribution_vector().items()}
