"""Same data judged over the whole job (coordinator.attribution.history): a pair alike round after round is paid as
one member at settlement, in round 1 too, in a round where its similarity dips and after it changes behaviour, and
pairs alike only as much as members with different data are never grouped. Similarity levels are the ones measured
on PLAID (bench/adversary_bench.py, seeds 0-2): same-data pairs 0.39-0.82 a round and >= 0.54 on average over a job,
pairs of members with different data <= 0.47 a round and <= 0.41 on average."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from coordinator.attribution import AttributionAccount, RoundValuation, ScreenSettings, ValuationMethod

SETTINGS = ScreenSettings()
VICTIM, SYBIL = "m0", "sybil"
OTHERS = ("m1", "m2", "m3")
PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None)
# The settlement is integer arithmetic over each round's values rounded to nano-units: half a unit per member-round.
ROUNDING = 1e-8


def round_valuation(
    round_index: int, values: dict[str, float], similarity: float | None, grouped: bool = False
) -> RoundValuation:
    """One round of the victim, the Sybil and three others; `similarity` of the pair (None: below what the
    screens report); `grouped`: the round's screens made the pair one player."""
    pair = [(VICTIM, SYBIL)] if grouped else [(VICTIM,), (SYBIL,)]
    return RoundValuation(
        round_index=round_index,
        method=ValuationMethod.EXACT,
        values=values,
        standard_errors=dict.fromkeys(values, 0.0),
        flags={},
        players=[*pair, *[(m,) for m in OTHERS]],
        evaluations=0,
        grand_utility=sum(values.values()),
        base_loss=1.0,
        similarities={} if similarity is None else {(VICTIM, SYBIL): similarity},
    )


def job(series: list[float | None], pair_values: list[tuple[float, float]]) -> AttributionAccount:
    """An account of len(series) rounds; the pair is one player in the rounds whose similarity reaches
    same_data_similarity (as the round's screens would make it)."""
    account = AttributionAccount(screen_settings=SETTINGS)
    for t, (similarity, (victim, sybil)) in enumerate(zip(series, pair_values, strict=True), start=1):
        grouped = similarity is not None and similarity >= SETTINGS.same_data_similarity
        values = {VICTIM: victim, SYBIL: sybil, **dict.fromkeys(OTHERS, 0.2)}
        account.add(round_valuation(t, values, similarity, grouped))
    return account


def pair_total(totals: dict[str, float]) -> float:
    return totals[VICTIM] + totals[SYBIL]


def kept(*players: float) -> float:
    """What two players paid as one member keep (protocol.job_attribution, kept="smaller"): the settlement reads
    values in nano-units, so a value that rounds to 0 is not above 0."""
    positive = [v for v in players if round(v * 1e9) > 0]
    return min(positive) if positive else max(players)


def test_a_pair_alike_over_the_job_is_paid_as_one_member_in_round_1_too() -> None:
    # PLAID, seed 2: a re-seeded pair at 0.49 in round 1 (below same_data_similarity, no round before it), then
    # 0.71, 0.61, 0.67. Round 1 paid both (0.3 each); as one member the pair keeps 0.3.
    account = job([0.49, 0.71, 0.61, 0.67], [(0.3, 0.3), (0.1, 0.1), (0.05, 0.05), (0.05, 0.05)])
    assert account.job_pairs() == [(VICTIM, SYBIL)]
    assert account.paid_as_one() == [[(VICTIM, SYBIL)]] * 4
    settled = account.settled_totals()
    assert pair_total(settled) == pytest.approx(0.3 + 0.2 + 0.1 + 0.1)
    assert settled[VICTIM] == pytest.approx(settled[SYBIL])
    assert {m: settled[m] for m in OTHERS} == {m: account.totals[m] for m in OTHERS}
    assert "same_data" in account.screens[SYBIL]
    assert account.attribution_vector()[SYBIL] == round(settled[SYBIL] * 1e9)
    assert account.job_groups() == {(VICTIM, SYBIL): [1, 2, 3, 4]}


def test_a_round_whose_similarity_dips_is_paid_as_one_member_too() -> None:
    # PLAID, 10 members, seed 0: a node holding 70 % of a member's data at 0.56, 0.39, 0.63, 0.59. Round 2 is below
    # what keeps a round's pair one player (0.42), yet not below same_data_linked: the job pays it as one member,
    # which keeps the smaller of its two players' values.
    values = [(0.0028, 0.0046), (0.0048, 0.0066), (0.0017, 0.0028), (0.0029, 0.0021)]
    account = job([0.56, 0.39, 0.63, 0.59], values)
    assert account.job_pairs() == [(VICTIM, SYBIL)]
    assert account.job_groups() == {(VICTIM, SYBIL): [1, 2, 3, 4]}
    settled = account.settled_totals()
    assert pair_total(settled) == pytest.approx(0.0074 + 0.0048 + 0.0045 + 0.0050)
    # Round 2's 0.0048 is split as the two were valued: neither is raised, neither keeps more than its share.
    assert settled[VICTIM] - account.totals[VICTIM] == pytest.approx(0.0048 * 0.0048 / 0.0114 - 0.0048)
    # Below same_data_linked, the round is the members' own, as for members with different data.
    lower = job([0.56, SETTINGS.same_data_linked - 0.01, 0.63, 0.59], values)
    assert lower.job_groups() == {(VICTIM, SYBIL): [1, 3, 4]}
    assert pair_total(lower.settled_totals()) == pytest.approx(0.0074 + 0.0114 + 0.0045 + 0.0050)


def test_a_pair_alike_only_as_much_as_members_with_different_data_is_never_grouped() -> None:
    # PLAID, seed 1: two members with different data at 0.35-0.47 in every round.
    account = job([0.35, 0.35, 0.38, 0.44, 0.47], [(0.3, 0.3)] * 5)
    assert account.job_pairs() == []
    assert account.settled_totals() == pytest.approx(account.totals, abs=ROUNDING)
    assert "same_data" not in account.screens[SYBIL]


def test_changing_behaviour_after_the_evidence_does_not_undo_the_group() -> None:
    # Alike in rounds 1-3 (round 1 below same_data_similarity), then different: the job group stays, round 1 is
    # paid as one member (the smaller of its two players' values) and the rounds after are the members' own.
    account = job([0.49, 0.6, 0.6, None, None], [(0.3, 0.2)] * 3 + [(0.1, 0.1)] * 2)
    assert account.job_pairs() == [(VICTIM, SYBIL)]
    settled = account.settled_totals()
    assert pair_total(settled) == pytest.approx(0.2 + 0.5 + 0.5 + 0.2 + 0.2)
    assert settled[SYBIL] == pytest.approx(0.2 * 0.2 / 0.5 + 0.2 + 0.2 + 0.1 + 0.1)
    # Diverging early enough escapes: one round alike at 0.49 is no more than members with different data reach.
    assert job([0.49, None, None], [(0.3, 0.2)] * 3).job_pairs() == []


def test_a_member_valued_below_0_keeps_its_value_in_a_group() -> None:
    account = job([0.49, 0.8, 0.8], [(0.4, -0.1), (0.1, 0.1), (0.1, 0.1)])
    settled = account.settled_totals()
    # Round 1: the pair earned 0.3, less than its best player's 0.4: nothing to take, nobody raised.
    assert settled[SYBIL] == pytest.approx(account.totals[SYBIL])
    assert settled[VICTIM] == pytest.approx(account.totals[VICTIM])


similarity_of_same_data = st.floats(0.43, 0.85)
similarity_of_different_data = st.floats(0.0, 0.47)
value = st.floats(-0.2, 1.0)


@PROPERTY
@given(
    series=st.lists(similarity_of_same_data, min_size=4, max_size=10).filter(lambda s: sum(s) / len(s) >= 0.54),
    values=st.lists(st.tuples(value, value), min_size=10, max_size=10),
)
def test_a_same_data_pair_is_paid_as_one_member_in_every_round(
    series: list[float], values: list[tuple[float, float]]
) -> None:
    account = job(list(series), values[: len(series)])
    assert account.job_pairs() == [(VICTIM, SYBIL)]
    # A round's one player already weighs as one member; two players of the pair keep the smaller value of those
    # valued above 0 (one below 0 lowers nothing).
    one_member = sum(
        victim + sybil if similarity >= SETTINGS.same_data_similarity else min(victim + sybil, kept(victim, sybil))
        for similarity, (victim, sybil) in zip(series, values, strict=False)
    )
    assert pair_total(account.settled_totals()) <= one_member + ROUNDING


@PROPERTY
@example(series=[0.47] * 10 + [0.0] * 2, values=[(0.3, 0.3)] * 12)  # alike as much as they ever were, 10 rounds
@given(
    series=st.lists(similarity_of_different_data, min_size=1, max_size=12).filter(lambda s: sum(s) / len(s) <= 0.41),
    values=st.lists(st.tuples(value, value), min_size=12, max_size=12),
)
def test_members_with_different_data_are_never_paid_as_one(
    series: list[float], values: list[tuple[float, float]]
) -> None:
    account = job(list(series), values[: len(series)])
    assert account.job_pairs() == []
    assert account.settled_totals() == pytest.approx(account.totals, abs=ROUNDING)


@PROPERTY
@given(
    series=st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), min_size=1, max_size=10),
    values=st.lists(st.tuples(value, value), min_size=10, max_size=10),
)
def test_the_job_grouping_never_raises_a_value_nor_a_pair_above_what_it_was_valued(
    series: list[float | None], values: list[tuple[float, float]]
) -> None:
    account = job(series, values[: len(series)])
    settled = account.settled_totals()
    assert all(settled[m] <= account.totals[m] + ROUNDING for m in account.totals)
    assert {m: settled[m] for m in OTHERS} == pytest.approx({m: account.totals[m] for m in OTHERS}, abs=ROUNDING)
