"""Screens, method selection, accumulation and reputation on synthetic updates with known structure."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from coordinator.attribution import (
    AttributionAccount,
    ReputationBook,
    RoundUpdates,
    RoundValuation,
    ScreenFlag,
    ScreenReason,
    ScreenSettings,
    ValuationMethod,
    ValuationSettings,
    groups,
    screen_updates,
    value_round,
)
from coordinator.attribution.screens import leave_one_out_medians
from protocol.errors import MalformedError

D = 4000
SETTINGS = ScreenSettings()


def honest_updates(m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """m updates that share a common descent direction plus individual parts, as real local steps do."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(D).astype(np.float32)
    own = rng.standard_normal((m, D)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, size=(m, 1)).astype(np.float32)
    global_params = rng.standard_normal(D).astype(np.float32) * 10
    return global_params, (0.01 * scale * (common + own)).astype(np.float32)


def reasons(report_flags: dict[int, list[ScreenFlag]], i: int) -> set[ScreenReason]:
    return {f.reason for f in report_flags.get(i, [])}


def test_honest_updates_pass_every_screen() -> None:
    global_params, deltas = honest_updates(8)
    report = screen_updates(deltas, settings=SETTINGS, global_params=global_params)
    assert report.flags == {}
    assert report.players == [(i,) for i in range(8)]


def test_each_free_rider_gets_its_reason() -> None:
    global_params, deltas = honest_updates(6)
    rng = np.random.default_rng(1)
    previous = deltas[:4].mean(axis=0)
    riders = np.stack(
        [
            np.zeros(D, np.float32),  # 6: zero
            rng.standard_normal(D).astype(np.float32) * float(np.linalg.norm(deltas[0])) / np.sqrt(D),  # 7: random
            previous + 1e-4 * rng.standard_normal(D).astype(np.float32),  # 8: stale
            np.full(D, np.nan, np.float32),  # 9: non-finite
            rng.standard_normal(D).astype(np.float32) * 10 - global_params,  # 10: a fresh random model
        ]
    )
    report = screen_updates(
        np.concatenate([deltas, riders]), settings=SETTINGS, global_params=global_params, previous_global_delta=previous
    )
    assert reasons(report.flags, 6) == {ScreenReason.ZERO_UPDATE}
    assert reasons(report.flags, 7) == {ScreenReason.RANDOM_DIRECTION}
    assert reasons(report.flags, 8) == {ScreenReason.STALE_UPDATE}
    assert reasons(report.flags, 9) == {ScreenReason.NON_FINITE}
    assert reasons(report.flags, 10) == {ScreenReason.RANDOM_WEIGHTS}
    assert all(report.excluded(i) for i in range(6, 11))
    assert [g for g in report.players] == [(i,) for i in range(6)]
    assert not any(report.excluded(i) for i in range(6))


def test_an_update_far_longer_than_the_others_is_clipped_to_the_limit_not_excluded() -> None:
    # Member 5 sends its own direction at thirty times the size: an honest member with far more data than the
    # others (more local steps) and a booster look alike without verified example counts. Neither is excluded;
    # the update is valued and aggregated at the limit's length.
    global_params, deltas = honest_updates(6)
    norms = np.linalg.norm(deltas, axis=1)
    deltas[5] *= 30
    report = screen_updates(deltas, settings=SETTINGS, global_params=global_params)
    ratio = float(np.linalg.norm(deltas[5])) / float(np.median(norms[:5]))
    assert reasons(report.flags, 5) == {ScreenReason.NORM_OUTLIER}
    assert not report.excluded(5) and (5,) in report.players
    assert report.clipped == {5: pytest.approx(SETTINGS.norm_ratio_limit / ratio, rel=1e-5)}
    assert report.clipped[5] * float(np.linalg.norm(deltas[5])) == pytest.approx(10 * float(np.median(norms[:5])))
    assert float(np.linalg.norm(deltas[5])) == pytest.approx(30 * norms[5])  # the caller's array is left as it was
    within = screen_updates(deltas[:5], settings=SETTINGS, global_params=global_params)
    assert within.clipped == {} and within.flags == {}


def test_a_member_far_from_the_others_is_kept_when_it_learns_what_it_learnt_last_round() -> None:
    # Member 5 holds data no one else has: its update is noise-like against the others' consensus and the
    # validation gradient (here: none), as honest PLAID members were in later rounds. Fresh noise of the same size
    # (member 6) is not kept; neither is member 5 without its previous update, which is what proves it has data.
    global_params, deltas = honest_updates(5)
    rng = np.random.default_rng(7)
    size = float(np.linalg.norm(deltas[0])) / np.sqrt(D)
    own_data = rng.standard_normal(D).astype(np.float32) * size
    different = own_data + 0.3 * size * rng.standard_normal(D).astype(np.float32)
    noise = rng.standard_normal(D).astype(np.float32) * size
    updates = np.concatenate([deltas, different[None, :], noise[None, :]])
    last_round = [*deltas[::-1], own_data, rng.standard_normal(D).astype(np.float32) * size]

    with_history = screen_updates(updates, settings=SETTINGS, global_params=global_params, previous_updates=last_round)
    assert not with_history.excluded(5)
    assert reasons(with_history.flags, 6) == {ScreenReason.RANDOM_DIRECTION}
    without = screen_updates(updates, settings=SETTINGS, global_params=global_params)
    assert reasons(without.flags, 5) == {ScreenReason.RANDOM_DIRECTION}
    # Off switch: persistence_z 0 gives the screen without the rescue.
    off = screen_updates(
        updates, settings=ScreenSettings(persistence_z=0.0), global_params=global_params, previous_updates=last_round
    )
    assert reasons(off.flags, 5) == {ScreenReason.RANDOM_DIRECTION}
    # Member 5 had shown evidence of data in an earlier round: rescued. A member that never showed any is not: one
    # noise direction sent every round persists as data does.
    for shown, kept in ((True, True), (False, False)):
        report = screen_updates(
            updates,
            settings=SETTINGS,
            global_params=global_params,
            previous_updates=last_round,
            evidenced=[True] * 5 + [shown, True],
        )
        assert report.excluded(5) is not kept
    # The members whose players showed evidence this round are reported: the honest ones, not the noise.
    assert set(range(5)) <= with_history.evidenced and 6 not in with_history.evidenced


def test_a_pair_grouped_last_round_stays_one_player_at_a_lower_similarity() -> None:
    # Member 6 trained part of member 0's data: one round's similarity is noisy, here between same_data_persisting
    # and same_data_similarity. Alone this round it is a player of its own; grouped with member 0 last round, it
    # stays in one player with it.
    _, deltas = honest_updates(6)
    noise = np.random.default_rng(5).standard_normal(D).astype(np.float32)
    partial = deltas[0] + 1.55 * noise * float(np.linalg.norm(deltas[0])) / np.sqrt(D)
    updates = np.concatenate([deltas, partial[None, :]])
    unit = updates / np.linalg.norm(updates, axis=1, keepdims=True)
    similarity = float(groups.pair_similarities(unit.astype(np.float64), [(0, 6)])[0])
    assert SETTINGS.same_data_persisting <= similarity < SETTINGS.same_data_similarity

    assert screen_updates(updates, settings=SETTINGS).players == [(i,) for i in range(7)]
    report = screen_updates(updates, settings=SETTINGS, grouped_before=[(0, 6)])
    assert report.players == [(0, 6), *[(i,) for i in range(1, 6)]]
    assert reasons(report.flags, 6) == {ScreenReason.SAME_DATA}
    # An honest pair of different data grouped last round is not kept together.
    assert screen_updates(updates, settings=SETTINGS, grouped_before=[(1, 2)]).players == [(i,) for i in range(7)]


def test_near_duplicates_form_one_player() -> None:
    deltas = honest_updates(5)[1]
    copy = deltas[2] * 1.0001
    report = screen_updates(np.concatenate([deltas, copy[None, :], deltas[4][None, :]]), settings=SETTINGS)
    assert report.players == [(0,), (1,), (2, 5), (3,), (4, 6)]
    assert reasons(report.flags, 5) == {ScreenReason.NEAR_DUPLICATE}
    assert not report.excluded(5)


def test_near_duplicates_found_through_the_sketch_above_256_members() -> None:
    _, deltas = honest_updates(300, seed=3)
    deltas[299] = deltas[17] + 1e-6 * deltas[3]
    report = screen_updates(deltas, settings=SETTINGS)
    assert (17, 299) in report.players
    assert sum(len(g) for g in report.players) == 300
    assert len(report.players) == 299


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=40))
def test_leave_one_out_medians_match_the_median_of_the_others(values: list[float]) -> None:
    # Ties included: the screens' vectorised "median of the others" must be np.median with the element removed.
    array = np.array(values)
    expected = [float(np.median(np.delete(array, i))) for i in range(len(values))]
    assert leave_one_out_medians(array).tolist() == pytest.approx(expected, rel=0, abs=0)


def test_same_data_pairs_through_the_sketch_equal_the_exact_pairs() -> None:
    # Above 256 rows the pairs come from a sketch confirmed by exact cosines: they must be the exact test's pairs.
    rng = np.random.default_rng(5)
    common = rng.standard_normal(2000)
    rows = 0.3 * common + rng.standard_normal((300, 2000))
    for a, b, mix in ((3, 250, 0.9), (10, 11, 0.7), (40, 41, 0.55), (60, 290, 0.3)):
        rows[b] = mix * rows[a] + (1 - mix) * rows[b]
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    total = unit.sum(axis=0)
    exact = groups._centred_similarity(unit @ unit.T, unit @ total, float(total @ total), 298)
    expected = {(int(r), int(c)) for r, c in zip(*np.nonzero(np.triu(exact >= 0.5, k=1)), strict=True)}
    found = groups.same_data_pairs(unit, 0.5)
    assert unit.shape[0] > groups.SKETCH_ABOVE
    assert {(a, b) for a, b, _ in found} == expected
    assert {(3, 250), (10, 11)} <= expected
    for a, b, similarity in found:
        assert similarity == pytest.approx(exact[a, b], abs=1e-5)


def test_self_report_mismatch_is_flagged_not_excluded() -> None:
    _, deltas = honest_updates(4)
    report = screen_updates(
        deltas, settings=SETTINGS, reported_examples=[100, 1000, 105, None], verified_examples=[100, 100, 100, 100]
    )
    assert reasons(report.flags, 1) == {ScreenReason.SELF_REPORT_MISMATCH}
    assert report.flags[1][0].measured == 10.0
    assert not report.excluded(1)
    assert set(report.flags) == {1}


def quadratic_loss(target: np.ndarray) -> Callable[[np.ndarray], float]:
    def loss(params: np.ndarray) -> float:
        return float(np.sum((params.astype(np.float64) - target) ** 2))

    return loss


def test_method_is_chosen_by_player_count() -> None:
    rng = np.random.default_rng(5)
    target = rng.standard_normal(D)
    global_params = np.zeros(D, np.float32)

    def gradient(params: np.ndarray) -> np.ndarray:
        return (2 * (params.astype(np.float64) - target)).astype(np.float32)

    settings = ValuationSettings(exact_max_players=4, sampled_max_players=8)
    methods = []
    for m in (3, 6, 12):
        deltas = (0.05 * (target + rng.standard_normal((m, D)))).astype(np.float32)
        updates = RoundUpdates(1, [f"m{i}" for i in range(m)], global_params, deltas)
        valuation = value_round(updates, quadratic_loss(target), settings, gradient=gradient)
        methods.append(valuation.method)
        assert all(v > 0 for v in valuation.values.values())
        assert sum(valuation.weights.values()) == pytest.approx(1.0)
    assert methods == [ValuationMethod.EXACT, ValuationMethod.SAMPLED, ValuationMethod.FIRST_ORDER]
    with pytest.raises(MalformedError):
        value_round(updates, quadratic_loss(target), settings)


def test_group_shares_one_value_and_excluded_get_zero() -> None:
    rng = np.random.default_rng(6)
    target = rng.standard_normal(D)
    global_params = np.zeros(D, np.float32)
    base = (0.05 * (target + rng.standard_normal((3, D)))).astype(np.float32)
    deltas = np.concatenate([base, base[1][None, :], np.zeros((1, D), np.float32)])
    names = ["a", "b", "c", "b-copy", "idle"]
    valuation = value_round(RoundUpdates(1, names, global_params, deltas), quadratic_loss(target), ValuationSettings())
    alone = value_round(RoundUpdates(1, names[:3], global_params, base), quadratic_loss(target), ValuationSettings())
    assert valuation.values["idle"] == 0.0
    assert valuation.values["b"] == valuation.values["b-copy"]
    assert valuation.values["b"] + valuation.values["b-copy"] == pytest.approx(alone.values["b"], rel=1e-6)
    assert valuation.players == [("a",), ("b", "b-copy"), ("c",)]
    assert sum(valuation.values.values()) == pytest.approx(valuation.grand_utility, rel=1e-9)


def _orthogonal_to(rng: np.random.Generator, vector: np.ndarray, norm: float) -> np.ndarray:
    other = rng.standard_normal(D)
    other -= (other @ vector) / (vector @ vector) * vector
    return (norm * other / np.linalg.norm(other)).astype(np.float32)


def test_one_members_devices_are_one_player_valued_as_the_sum_of_their_updates() -> None:
    rng = np.random.default_rng(8)
    target = rng.standard_normal(D)
    global_params = np.zeros(D, np.float32)
    # Member m's data spread over two devices: each learns half of what one device holding all of it would (the
    # common direction at half the step, its own examples), and the one device's update is their sum.
    halves = (0.02 * (target + 1.4 * rng.standard_normal((2, D)))).astype(np.float32)
    base = np.concatenate([0.05 * (target + rng.standard_normal((3, D))), halves.sum(axis=0)[None, :]])
    base = base.astype(np.float32)
    on_one = value_round(
        RoundUpdates(1, ["a", "b", "c", "m"], global_params, base), quadratic_loss(target), ValuationSettings()
    )
    names = ["a", "b", "c", "m-phone", "m-hub"]
    on_two = value_round(
        RoundUpdates(1, names, global_params, np.concatenate([base[:3], halves]), owners=["a", "b", "c", "m", "m"]),
        quadratic_loss(target),
        ValuationSettings(),
    )
    assert on_two.players == [("a",), ("b",), ("c",), ("m-phone", "m-hub")]
    assert on_two.values["m-phone"] + on_two.values["m-hub"] == pytest.approx(on_one.values["m"], rel=1e-5)
    assert on_two.values["m-phone"] == on_two.values["m-hub"]
    assert on_two.combined == {"m-phone": 2.0, "m-hub": 2.0}
    assert on_two.weights["m-phone"] + on_two.weights["m-hub"] == pytest.approx(0.25)
    assert {f.reason for f in on_two.flags["m-hub"]} == {ScreenReason.SAME_MEMBER}


def test_a_members_second_device_sending_its_data_again_under_noise_earns_nothing_more() -> None:
    rng = np.random.default_rng(9)
    target = rng.standard_normal(D)
    global_params = np.zeros(D, np.float32)
    base = (0.05 * (target + rng.standard_normal((5, D)))).astype(np.float32)
    mine = base[4].astype(np.float64)
    # The member's data trained again, 70 % of the energy noise, at the length of an update: too noisy to group.
    size = float(np.linalg.norm(mine))
    again = (np.sqrt(0.3) * mine + _orthogonal_to(rng, mine, np.sqrt(0.7) * size)).astype(np.float32)
    deltas = np.concatenate([base, again[None, :]])
    names = ["a", "b", "c", "d", "m", "m-again"]
    alone = value_round(RoundUpdates(1, names[:5], global_params, base), quadratic_loss(target), ValuationSettings())
    as_two = value_round(RoundUpdates(1, names, global_params, deltas), quadratic_loss(target), ValuationSettings())
    as_one = value_round(
        RoundUpdates(1, names, global_params, deltas, owners=["a", "b", "c", "d", "m", "m"]),
        quadratic_loss(target),
        ValuationSettings(),
    )
    assert len(as_two.players) == 6  # the noise hides the same data: paid as two members
    pair = as_two.values["m"] + as_two.values["m-again"]
    assert pair > 1.2 * alone.values["m"]
    member = as_one.values["m"] + as_one.values["m-again"]
    assert ("m", "m-again") in as_one.players
    assert member <= 1.1 * alone.values["m"]  # 0.87×, where as two members 1.27×
    # A device of the member sending noise is screened on its own, not hidden in its member's data.
    noise = _orthogonal_to(rng, mine, size)
    screened = value_round(
        RoundUpdates(
            1, names, global_params, np.concatenate([base, noise[None, :]]), owners=["a", "b", "c", "d", "m", "m"]
        ),
        quadratic_loss(target),
        ValuationSettings(),
    )
    assert {f.reason for f in screened.flags["m-again"]} == {ScreenReason.RANDOM_DIRECTION}
    assert ("m",) in screened.players and screened.values["m"] == pytest.approx(alone.values["m"], rel=0.2)


def test_a_members_devices_alike_below_the_round_threshold_are_one_part_not_added_up() -> None:
    # A second device holding most of the member's data, noisy enough that the pair is alike at 0.40: below the 0.5
    # that makes two members one player, above the 0.3 that links a job's pair. Within one member the link is
    # enough: the two are combined by their shares (about one update), not added up (1.18x the member's value).
    rng = np.random.default_rng(11)
    target = rng.standard_normal(D)
    global_params = np.zeros(D, np.float32)
    base = (0.05 * (target + rng.standard_normal((6, D)))).astype(np.float32)
    most = (0.7 * base[5] + 1.8 * 0.05 * rng.standard_normal(D)).astype(np.float32)
    names = ["a", "b", "c", "d", "e", "m", "m-most"]
    alone = value_round(RoundUpdates(1, names[:6], global_params, base), quadratic_loss(target), ValuationSettings())
    both = value_round(
        RoundUpdates(1, names, global_params, np.concatenate([base, most[None, :]]), owners=[*names[:6], "m"]),
        quadratic_loss(target),
        ValuationSettings(),
    )
    assert 0.3 <= both.similarities[("m", "m-most")] < 0.5
    assert ("m", "m-most") in both.players
    assert both.values["m"] + both.values["m-most"] <= alone.values["m"]
    assert both.combined == {"m": 1.0, "m-most": 1.0}  # one part: nothing summed


def test_a_members_device_copying_another_member_stays_that_members_copy() -> None:
    rng = np.random.default_rng(10)
    target = rng.standard_normal(D)
    global_params = np.zeros(D, np.float32)
    base = (0.05 * (target + rng.standard_normal((5, D)))).astype(np.float32)
    names = ["a", "b", "c", "d", "e", "a-copy"]
    deltas = np.concatenate([base, 0.5 * base[1][None, :]])
    alone = value_round(RoundUpdates(1, names[:5], global_params, base), quadratic_loss(target), ValuationSettings())
    copied = value_round(
        RoundUpdates(1, names, global_params, deltas, owners=["a", "b", "c", "d", "e", "a"]),
        quadratic_loss(target),
        ValuationSettings(),
    )
    # Joining a's devices would put half of b's update in a's player: the copy stays with b, shared by size.
    assert ("a",) in copied.players and ("b", "a-copy") in copied.players
    assert {f.reason for f in copied.flags["a-copy"]} == {ScreenReason.NEAR_DUPLICATE}
    assert copied.values["a"] == pytest.approx(alone.values["a"], rel=1e-3)
    assert copied.values["a-copy"] < 0.01 * copied.values["b"]


def test_verified_counts_set_weights_and_self_reports_do_not() -> None:
    rng = np.random.default_rng(7)
    target = rng.standard_normal(D)
    deltas = (0.05 * (target + rng.standard_normal((3, D)))).astype(np.float32)
    settings = ValuationSettings(example_count_cap=300)
    common = {"round_index": 1, "members": ["a", "b", "c"], "global_params": np.zeros(D, np.float32)}
    truthful = value_round(
        RoundUpdates(**common, updates=deltas, reported_examples=[100, 200, 400], verified_examples=[100, 200, 400]),
        quadratic_loss(target),
        settings,
    )
    assert truthful.weights == pytest.approx({"a": 100 / 600, "b": 200 / 600, "c": 300 / 600})
    lying = value_round(
        RoundUpdates(**common, updates=deltas, reported_examples=[100, 2000, 400], verified_examples=[100, 200, 400]),
        quadratic_loss(target),
        settings,
    )
    assert lying.values == truthful.values
    assert lying.weights == truthful.weights


def test_bad_round_input_is_refused() -> None:
    with pytest.raises(MalformedError):
        value_round(
            RoundUpdates(1, ["a", "a"], np.zeros(3, np.float32), np.zeros((2, 3), np.float32)),
            lambda p: 0.0,
            ValuationSettings(),
        )
    with pytest.raises(MalformedError):
        value_round(
            RoundUpdates(1, ["a", "b"], np.zeros(3, np.float32), np.zeros((3, 3), np.float32)),
            lambda p: 0.0,
            ValuationSettings(),
        )
    with pytest.raises(MalformedError, match="one owner per member"):
        value_round(
            RoundUpdates(1, ["a", "b"], np.zeros(3, np.float32), np.zeros((2, 3), np.float32), owners=["a"]),
            lambda p: 0.0,
            ValuationSettings(),
        )


def valuation(
    round_index: int, values: dict[str, float], flags: dict[str, list[ScreenFlag]] | None = None
) -> RoundValuation:
    return RoundValuation(
        round_index=round_index,
        method=ValuationMethod.EXACT,
        values=values,
        standard_errors=dict.fromkeys(values, 0.0),
        flags=flags or {},
        players=[(m,) for m in values],
        evaluations=0,
        grand_utility=sum(values.values()),
        base_loss=1.0,
    )


def test_account_accumulates_with_decay_and_counts_exclusions() -> None:
    account = AttributionAccount(decay=0.5)
    zero = [ScreenFlag(ScreenReason.ZERO_UPDATE, 0.0)]
    account.add(valuation(1, {"a": 0.4, "b": 0.0}, {"b": zero}))
    account.add(valuation(2, {"a": 0.2, "b": 0.1}))
    assert account.totals == pytest.approx({"a": 0.5, "b": 0.05})
    assert account.attribution_vector() == {"a": 500_000_000, "b": 50_000_000}
    assert account.excluded_rounds == {"a": 0, "b": 1}
    assert account.screens == {"a": set(), "b": {"zero_update"}}
    with pytest.raises(MalformedError):
        account.add(valuation(2, {"a": 1.0}))
    with pytest.raises(MalformedError):
        AttributionAccount(decay=0.0)


def test_reputation_rewards_history_and_punishes_flags() -> None:
    book = ReputationBook()
    zero = [ScreenFlag(ScreenReason.ZERO_UPDATE, 0.0)]
    lie = [ScreenFlag(ScreenReason.SELF_REPORT_MISMATCH, 10.0)]
    assert book.score_milli("newcomer") == 500
    for r in range(1, 11):
        book.record(valuation(r, {"good": 0.1, "rider": 0.0, "liar": 0.1}, {"rider": zero, "liar": lie}))
    assert book.score_milli("good") > 900
    assert book.score_milli("rider") < 100
    assert 400 < book.score_milli("liar") < book.score_milli("good")
    assert book.meets("good", 800)
    assert not book.meets("rider", 300)


def test_reputation_survives_a_snapshot_and_rejects_garbage() -> None:
    book = ReputationBook(forgetting=0.9)
    zero = [ScreenFlag(ScreenReason.ZERO_UPDATE, 0.0)]
    book.record(valuation(1, {"a": 0.1, "b": 0.0}, {"b": zero}))
    restored = ReputationBook.from_json(book.to_json())
    assert restored == book
    assert restored.score_milli("b") == book.score_milli("b") < 500
    with pytest.raises(MalformedError):
        ReputationBook.from_json(b'{"forgetting": 2.0, "exclusion_weight": 1.0, "members": {}}')
    with pytest.raises(MalformedError):
        ReputationBook.from_json(b"not json")


def test_pairs_below_the_round_thresholds_are_reported_only_between_each_others_most_similar() -> None:
    # Triples of members: the first two share much of their update, the third a little of the first's. Every pair
    # of a triple is in [same_data_linked, same_data_persisting); a round reports the first two, each other's most
    # similar, and not the third, whose best partner is taken: at most one such pair per member, whatever m is.
    rng = np.random.default_rng(3)
    m, d = 60, 3000
    updates, shared = rng.standard_normal((m, d)), rng.standard_normal((m // 3, d))
    for k in range(m // 3):
        updates[3 * k : 3 * k + 3] += np.outer([0.75, 0.75, 0.55], shared[k])
    updates = (0.01 * updates).astype(np.float32)
    global_params = rng.standard_normal(d).astype(np.float32)
    reported = screen_updates(updates, settings=SETTINGS, global_params=global_params).similarities
    # With the round's own threshold lowered to same_data_linked, every pair down to it is reported.
    lowered = SETTINGS.model_copy(update={"same_data_persisting": SETTINGS.same_data_linked})
    every = screen_updates(updates, settings=lowered, global_params=global_params).similarities
    below = {pair: v for pair, v in every.items() if v < SETTINGS.same_data_persisting}
    assert len(below) > m // 3 and all(v >= SETTINGS.same_data_linked for v in below.values())
    best = {
        member: max((v, pair) for pair, v in every.items() if member in pair)[1] for pair in every for member in pair
    }
    mutual = {pair for pair in below if best[pair[0]] == pair == best[pair[1]]}
    assert mutual == {(3 * k, 3 * k + 1) for k in range(m // 3)}
    assert reported == {pair: v for pair, v in every.items() if pair in mutual or v >= SETTINGS.same_data_persisting}
