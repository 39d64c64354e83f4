"""Pay that cannot be gamed (issue 17), as properties: planted adversaries of every kind the issue names, against
honest members whose number, data sizes and seeds hypothesis draws, each run asserting the pay bounds of the issue. A
job is the ServerApp's attribution path with the engine taken out (bench/planted_adversaries.py: screens, valuation,
aggregation with the valuation's weights, settlement under the MID's default policy), on the synthetic world whose
difficulty the draw sets: few examples per member, sizes differing between members, each member holding classes no
other member holds (near-orthogonal honest updates). The same adversaries on PLAID and at 10 and 50 members are
bench/adversary_bench.py's table (BENCHMARKS.md); adaptive attacks beyond the issue's list (`Adversary.published`)
are measured there, not bounded here."""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not an installed package
from planted_adversaries import (
    ADVERSARIES,
    ADVERSARY,
    VICTIM,
    Adversary,
    Data,
    Job,
    JobResult,
    SyntheticWorld,
    attack,
)

from coordinator.attribution import RoundValuation, ScreenReason

DATA_FREE = [a for a in ADVERSARIES.values() if a.kind == "data-free" and not a.published]
SAME_DATA = [a for a in ADVERSARIES.values() if a.kind == "same-data" and not a.published]
COPYCATS = [a for a in ADVERSARIES.values() if a.kind == "copycat" and not a.published]
ROUNDS = 4
# The bounds (BENCHMARKS.md, "Planted adversaries"): data-free pay, same-data group pay, a copycat's cost.
MAX_DATA_FREE_SHARE = 0.005
MAX_GROUP_RATIO = 1.1
MAX_COPY_LOSS = 0.10
# Derandomized: the suite is deterministic (each test draws the same fixed sample every run). Random exploration
# with 25 examples a test (5-10 members) found the two counterexamples pinned in test_known_limits; more may exist
# (docs/attribution.md, section 7, says where the bounds stop holding).
PROPERTY = settings(
    max_examples=6, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass(frozen=True)
class Honest:
    """Honest members of one job: their example counts (one per member), the classes of the world, the seed."""

    counts: tuple[int, ...]
    classes: int
    seed: int

    def build(self) -> tuple[SyntheticWorld, list[Data]]:
        world = SyntheticWorld(classes=self.classes, classes_per_member=2, seed=self.seed)
        return world, world.member_data(self.counts, self.seed)


@st.composite
def honest_members(draw: st.DrawFn) -> Honest:
    """5-8 members with 4-40 examples each (sizes differing between members), 2 classes each, disjoint
    (near-orthogonal updates, the issue's hard case) in a world of 2 or 3 classes per member. Smaller federations and
    shared classes are outside what the screens hold to (test_known_limits, docs/attribution.md)."""
    members = draw(st.integers(5, 8))  # up to 8: exact Shapley stays cheap (10 and 50: bench/adversary_bench.py)
    counts = draw(st.lists(st.integers(4, 40), min_size=members, max_size=members))
    classes = draw(st.sampled_from([2 * members, 3 * members]))
    return Honest(tuple(counts), classes, draw(st.integers(0, 10_000)))


def _reasons(valuation: RoundValuation, member: str) -> set[ScreenReason]:
    return {flag.reason for flag in valuation.flags.get(member, [])}


def _honest_exclusions(result: JobResult, members: int) -> list[tuple[int, str]]:
    names = [f"m{i:03d}" for i in range(members)]
    return [(v.round_index, n) for v in result.valuations for n in names if any(f.excludes for f in v.flags.get(n, []))]


@pytest.mark.parametrize("adversary", DATA_FREE, ids=lambda a: a.name)
@PROPERTY
@given(honest=honest_members())
def test_a_data_free_update_earns_at_most_half_a_percent_of_the_pool(adversary: Adversary, honest: Honest) -> None:
    world, data = honest.build()
    outcome = attack(world, adversary, data, ROUNDS, honest.seed)
    assert outcome.adversary_share <= MAX_DATA_FREE_SHARE, (outcome.adversary_share, outcome.attacked.pay)
    assert _honest_exclusions(outcome.attacked, len(data)) == []


@pytest.mark.parametrize("adversary", SAME_DATA, ids=lambda a: a.name)
@PROPERTY
@given(honest=honest_members())
def test_nodes_training_the_same_data_earn_together_at_most_1_1x_one_member(
    adversary: Adversary, honest: Honest
) -> None:
    world, data = honest.build()
    outcome = attack(world, adversary, data, ROUNDS, honest.seed)
    assert outcome.group_ratio <= MAX_GROUP_RATIO, (outcome.group_ratio, outcome.clean.pay, outcome.attacked.pay)
    assert _honest_exclusions(outcome.attacked, len(data)) == []


@PROPERTY
@given(honest=honest_members())
def test_a_same_data_node_that_changes_behaviour_keeps_the_pair_within_1_1x(honest: Honest) -> None:
    # Same data in rounds 1-2, a random direction after: the job's grouping (history.AttributionAccount) is not
    # undone by what the node does once the evidence is in. On PLAID: 1.05x at most (1.26x per round groups only).
    world, data = honest.build()
    outcome = attack(world, ADVERSARIES["re-seeded then noise"], data, ROUNDS, honest.seed)
    assert outcome.group_ratio <= MAX_GROUP_RATIO, (outcome.group_ratio, outcome.clean.pay, outcome.attacked.pay)


@pytest.mark.parametrize("adversary", COPYCATS, ids=lambda a: a.name)
@PROPERTY
@given(honest=honest_members())
def test_a_copycat_costs_the_member_it_copies_at_most_a_tenth_of_its_pay(adversary: Adversary, honest: Honest) -> None:
    # Scope: the copied member holds at most twice the others' median data. A larger member's copy is as large as
    # the typical update, and such a copy is paid like the original (test_known_limits; docs/attribution.md, 7).
    assume(2 * statistics.median(honest.counts[1:]) >= honest.counts[0])
    world, data = honest.build()
    outcome = attack(world, adversary, data, ROUNDS, honest.seed)
    assert outcome.victim_loss <= MAX_COPY_LOSS, (outcome.victim_loss, outcome.clean.pay, outcome.attacked.pay)
    # The copy earns no more than the member it copies lost to it... nor than the member itself.
    assert outcome.attacked.pay.get(ADVERSARY, 0) <= outcome.attacked.pay.get(VICTIM, 0)


@pytest.mark.parametrize("adversary", DATA_FREE + SAME_DATA + COPYCATS, ids=lambda a: a.name)
@PROPERTY
@given(honest=honest_members())
def test_a_members_second_device_earns_the_member_nothing_one_device_would_not(
    adversary: Adversary, honest: Honest
) -> None:
    # The adversary is a device of the member it copies: one player with it (docs/attribution.md, section 3).
    world, data = honest.build()
    outcome = attack(world, adversary, data, ROUNDS, honest.seed, victims_device=True)
    assert outcome.group_ratio <= MAX_GROUP_RATIO, (outcome.group_ratio, outcome.clean.pay, outcome.attacked.pay)
    assert outcome.adversary_share <= MAX_DATA_FREE_SHARE or adversary.kind != "data-free", outcome.adversary_share
    assert _honest_exclusions(outcome.attacked, len(data)) == []


@PROPERTY
@given(honest=honest_members())
@example(honest=Honest((8, 8, 8, 8, 8), 10, 0))  # it earned 0.8 % of the pool here before
def test_one_noise_direction_sent_every_round_earns_at_most_half_a_percent(honest: Honest) -> None:
    # It persists as data does, but it never shows evidence of data, which the random-direction screen's
    # persistence rescue asks for.
    world, data = honest.build()
    outcome = attack(world, ADVERSARIES["same noise every round"], data, ROUNDS, honest.seed)
    assert outcome.adversary_share <= MAX_DATA_FREE_SHARE, (outcome.adversary_share, outcome.attacked.pay)
    assert _honest_exclusions(outcome.attacked, len(data)) == []


@PROPERTY
@given(honest=honest_members())
def test_honest_members_with_few_examples_are_never_screened_out(honest: Honest) -> None:
    world, data = honest.build()
    result = Job(world, data, ROUNDS, honest.seed).run()
    assert _honest_exclusions(result, len(data)) == []
    assert all(result.pay.get(f"m{i:03d}", 0) >= 0 for i in range(len(data)))
    # No two of them are a same-data group over the job: the job's grouping takes nothing from honest members.
    assert result.account.job_pairs() == []
    assert result.pay == result.pay_round_groups_only


def test_a_member_with_far_more_data_than_the_others_is_clipped_not_screened_out() -> None:
    # Member 1 holds 8x the median examples and takes ~3x the local steps: without verified example counts its
    # update is more than norm_ratio_limit times the median norm in a round (it was screened out of that round
    # before the norm outlier was clipped instead). Now it is valued at the limit's length, and paid.
    world, data = Honest((11, 33, 4, 4, 4), 10, 0).build()
    result = Job(world, data, ROUNDS, 0).run()
    clipped = [v.round_index for v in result.valuations if "m001" in v.clipped]
    flagged = [v.round_index for v in result.valuations if ScreenReason.NORM_OUTLIER in _reasons(v, "m001")]
    assert clipped and clipped == flagged
    assert _honest_exclusions(result, len(data)) == []
    assert result.pay["m001"] > 0


@pytest.mark.xfail(strict=True, reason="known limits of issue 17's defences (docs/attribution.md, section 7)")
@pytest.mark.parametrize(
    ("adversary", "honest", "bound", "victims_device"),
    [
        # A copy whose size is at least the typical size is paid like the member it copies (groups.py caps both
        # at the typical size): the member holding 3x the median data loses 10.2 % of its pay to a noisy half copy.
        (ADVERSARIES["noisy half copy"], Honest((15, 5, 4, 4, 4), 10, 0), "copy loss <= 10 %", False),
        # A same-data node adding noise (70 % of the energy): one player with its member here, and the pair paid
        # 1.20x one member; on PLAID it stays below what groups a pair and is paid 1.87x at most (published).
        (ADVERSARIES["noisy re-seeded"], Honest((8, 8, 8, 8, 8), 20, 2), "pair <= 1.1x", False),
        # The same node as a second device of its member: one player with it whatever its noise, but the noise in
        # the member's update still moves its pay (1.20x here; on PLAID, where as a member of its own it is paid
        # up to 1.87x, BENCHMARKS.md has what it is paid as a device of its member's).
        (ADVERSARIES["noisy re-seeded"], Honest((8, 8, 8, 8, 8), 20, 2), "member <= 1.1x", True),
    ],
    ids=["copy-of-a-larger-than-typical-member", "noisy-same-data-node", "noisy-same-data-device"],
)
def test_known_limits(adversary: Adversary, honest: Honest, bound: str, victims_device: bool) -> None:
    world, data = honest.build()
    outcome = attack(world, adversary, data, ROUNDS, honest.seed, victims_device=victims_device)
    assert _honest_exclusions(outcome.attacked, len(data)) == [], bound
    assert outcome.victim_loss <= MAX_COPY_LOSS or adversary.kind != "copycat", bound
    assert outcome.group_ratio <= MAX_GROUP_RATIO or adversary.kind != "same-data", bound
    assert outcome.adversary_share <= MAX_DATA_FREE_SHARE or adversary.kind != "data-free", bound
