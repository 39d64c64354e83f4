"""Exact Shapley, GTG-style sampling and first-order values on real regression games (numpy least squares)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.attribution import CoalitionGame, exact_shapley, first_order_values, sampled_shapley
from protocol.errors import MalformedError, PolicyViolationError


@dataclass(frozen=True)
class Regression:
    global_params: np.ndarray
    deltas: np.ndarray
    weights: list[float]
    x_val: np.ndarray
    y_val: np.ndarray

    def loss(self, params: np.ndarray) -> float:
        return float(np.mean((self.x_val @ params.astype(np.float64) - self.y_val) ** 2))

    def gradient(self, params: np.ndarray) -> np.ndarray:
        residual = self.x_val @ params.astype(np.float64) - self.y_val
        return (2 * self.x_val.T @ residual / len(self.y_val)).astype(np.float32)

    def game(self, deltas: np.ndarray | None = None) -> CoalitionGame:
        chosen = self.deltas if deltas is None else deltas
        return CoalitionGame(self.loss, self.global_params, chosen, self.weights)


def regression(seed: int, members: int, *, d: int = 12, steps: int = 5) -> Regression:
    """Members run gradient descent on their own noisy samples of one linear model; the validation set is clean.
    Member i has 20 + 8 i samples and label noise growing with i, so values differ and mostly fall with i."""
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(d)
    x_val = rng.standard_normal((200, d))
    y_val = x_val @ truth
    noise = np.linspace(0.0, 3.0, members)
    global_params = np.zeros(d, dtype=np.float32)
    deltas = np.zeros((members, d), dtype=np.float32)
    for i in range(members):
        n_i = 20 + 8 * i
        x = rng.standard_normal((n_i, d))
        y = x @ truth + noise[i] * rng.standard_normal(n_i)
        theta = global_params.astype(np.float64)
        for _ in range(steps):
            theta -= 0.05 * 2 * x.T @ (x @ theta - y) / n_i
        deltas[i] = theta - global_params
    return Regression(global_params, deltas, [1.0 / members] * members, x_val, y_val)


def regression_game(seed: int, members: int, *, d: int = 12) -> CoalitionGame:
    return regression(seed, members, d=d).game()


def logistic_games(seed: int, members: int, *, d: int = 12) -> tuple[CoalitionGame, CoalitionGame]:
    """A game that is not quadratic in the coalition's model (the least-squares games are: an antithetic pair of
    permutations gives their exact Shapley values): members fit logistic regression by gradient descent on their own
    samples, member i with 30 + 10 i of them and a label flip rate growing with i; the loss is the validation log-loss.
    Returns two fresh games over it (one for exact Shapley, one for sampling)."""
    rng = np.random.default_rng(seed)
    truth = 2 * rng.standard_normal(d)
    x_val = rng.standard_normal((300, d))
    y_val = (x_val @ truth + 0.5 * rng.standard_normal(300) > 0).astype(float)
    flip = np.linspace(0.0, 0.45, members)
    deltas = np.zeros((members, d), dtype=np.float32)
    for i in range(members):
        n_i = 30 + 10 * i
        x = rng.standard_normal((n_i, d))
        y = (x @ truth > 0).astype(float)
        y = np.where(rng.random(n_i) < flip[i], 1 - y, y)
        theta = np.zeros(d)
        for _ in range(20):
            theta -= 0.5 * x.T @ (1 / (1 + np.exp(-(x @ theta))) - y) / n_i
        deltas[i] = theta

    def log_loss(params: np.ndarray) -> float:
        z = x_val @ params.astype(np.float64)
        return float(np.mean(np.logaddexp(0, z) - y_val * z))

    weights = [1.0 / members] * members
    start = np.zeros(d, dtype=np.float32)
    return CoalitionGame(log_loss, start, deltas, weights), CoalitionGame(log_loss, start, deltas, weights)


def brute_force_shapley(game: CoalitionGame) -> np.ndarray:
    """The definition: average marginal contribution over all m! orders."""
    m = game.players
    totals = np.zeros(m)
    orders = list(itertools.permutations(range(m)))
    for order in orders:
        mask = 0
        for player in order:
            before = game.utility(mask)
            mask |= 1 << player
            totals[player] += game.utility(mask) - before
    return totals / len(orders)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("members", [1, 2, 3, 4, 5, 6])
def test_exact_matches_brute_force(members: int) -> None:
    game = regression_game(members, members)
    np.testing.assert_allclose(exact_shapley(game), brute_force_shapley(game), rtol=1e-9, atol=1e-12)


def test_exact_uses_each_coalition_once() -> None:
    game = regression_game(1, 6)
    exact_shapley(game)
    assert game.evaluations == 2**6
    exact_shapley(game)
    assert game.evaluations == 2**6


def test_efficiency() -> None:
    game = regression_game(2, 8)
    values = exact_shapley(game)
    assert values.sum() == pytest.approx(game.grand_utility() - game.utility(0), rel=1e-9)
    assert game.grand_utility() > 0


def test_null_player_gets_zero() -> None:
    setup = regression(3, 5)
    deltas = setup.deltas.copy()
    deltas[2] = 0.0
    values = exact_shapley(setup.game(deltas))
    assert values[2] == 0.0
    assert np.all(np.delete(values, 2) != 0.0)


def test_symmetric_players_get_equal_values() -> None:
    setup = regression(4, 5)
    deltas = setup.deltas.copy()
    deltas[4] = deltas[1]
    values = exact_shapley(setup.game(deltas))
    assert values[4] == pytest.approx(values[1], rel=1e-6)  # float32 parameters
    assert values[1] != pytest.approx(values[0], rel=1e-3)


def test_exact_refuses_more_than_twelve_players() -> None:
    game = regression_game(5, 13, d=4)
    with pytest.raises(PolicyViolationError) as raised:
        exact_shapley(game)
    assert raised.value.details["players"] == 13


def test_game_rejects_mismatched_shapes() -> None:
    with pytest.raises(MalformedError):
        CoalitionGame(lambda p: 0.0, np.zeros(3, np.float32), np.zeros((2, 4), np.float32), [0.5, 0.5])
    with pytest.raises(MalformedError):
        CoalitionGame(lambda p: 0.0, np.zeros(3, np.float32), np.zeros((2, 3), np.float32), [1.0])


def test_sampling_tracks_exact_at_ten_players_within_a_quarter_of_the_evaluations() -> None:
    correlations = []
    for seed in range(20):
        exact_game = regression_game(100 + seed, 10)
        exact = exact_shapley(exact_game)
        assert exact_game.evaluations == 1024
        sampled_game = regression_game(100 + seed, 10)
        sampled = sampled_shapley(sampled_game, budget=256, seed=seed)
        assert sampled.evaluations <= 256
        assert sampled.pairs >= 3
        assert np.all(np.isfinite(sampled.standard_errors))
        correlations.append(spearman(exact, sampled.values))
    assert min(correlations) >= 0.95, correlations


def test_sampling_stops_early_on_games_that_are_not_quadratic_and_still_tracks_exact() -> None:
    correlations, evaluations = [], []
    for seed in range(20):
        exact_game, sampled_game = logistic_games(200 + seed, 10)
        exact = exact_shapley(exact_game)
        sampled = sampled_shapley(sampled_game, budget=256, seed=seed)
        correlations.append(spearman(exact, sampled.values))
        evaluations.append(sampled.evaluations)
    assert min(correlations) >= 0.95, correlations
    assert max(evaluations) < 256, evaluations


def test_sampling_does_not_stop_early_while_pairs_disagree() -> None:
    """In a game of independent random utilities no two pairs agree: the standard errors stay large and the whole
    budget is spent."""
    rng = np.random.default_rng(0)
    for seed in range(3):
        table = [0.0, *rng.standard_normal(1023)]
        result = sampled_shapley(table_game(10, table), budget=256, seed=seed)
        assert result.evaluations == 256
        assert result.pairs > 3


def test_sampling_is_deterministic_for_a_seed() -> None:
    first = sampled_shapley(regression_game(7, 10), budget=200, seed=42)
    again = sampled_shapley(regression_game(7, 10), budget=200, seed=42)
    other = sampled_shapley(regression_game(7, 10), budget=200, seed=43)
    np.testing.assert_array_equal(first.values, again.values)
    assert not np.array_equal(first.values, other.values)


def test_sampling_standard_error_shrinks_with_budget() -> None:
    small = sampled_shapley(regression_game(8, 10), budget=120, seed=1, convergence_tolerance=0.0)
    large = sampled_shapley(regression_game(8, 10), budget=1000, seed=1, convergence_tolerance=0.0)
    assert large.pairs > small.pairs
    assert float(np.mean(large.standard_errors)) < float(np.mean(small.standard_errors))


def test_between_round_truncation_skips_a_round_that_changes_nothing() -> None:
    setup = regression(9, 10)
    tiny = setup.game(setup.deltas * 1e-9)
    result = sampled_shapley(tiny, budget=256, seed=0)
    assert result.round_truncated
    assert result.evaluations == 2
    assert np.all(result.values == 0.0)


def test_first_order_matches_exact_for_small_updates() -> None:
    setup = regression(10, 8)
    small = setup.deltas * 1e-3
    exact = exact_shapley(setup.game(small))
    approx = first_order_values(setup.gradient, setup.global_params, small, setup.weights)
    np.testing.assert_allclose(approx, exact, rtol=2e-2)


def table_game(m: int, table: list[float]) -> CoalitionGame:
    """An arbitrary game: player i's update is the basis vector e_i, so the coalition model is its indicator vector
    and the loss reads U(S) off a table (U(empty) = table[0] = 0 by construction)."""

    def loss(params: np.ndarray) -> float:
        mask = int(sum(1 << i for i in range(m) if params[i] > 0.5))
        return -table[mask]

    return CoalitionGame(loss, np.zeros(m, np.float32), np.eye(m, dtype=np.float32), [1.0] * m)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 5), data=st.data())
def test_axioms_hold_for_arbitrary_games(m: int, data: st.DataObject) -> None:
    values_strategy = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
    table = [0.0, *data.draw(st.lists(values_strategy, min_size=2**m - 1, max_size=2**m - 1))]
    null = data.draw(st.integers(0, m - 1))
    for mask in range(1 << m):
        if mask >> null & 1:
            table[mask] = table[mask & ~(1 << null)]  # the null player adds nothing to any coalition
    game = table_game(m, table)
    values = exact_shapley(game)
    np.testing.assert_allclose(values, brute_force_shapley(game), atol=1e-9)
    assert values.sum() == pytest.approx(table[-1], abs=1e-9)
    assert values[null] == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 5), data=st.data())
def test_symmetric_players_in_arbitrary_games(m: int, data: st.DataObject) -> None:
    by_size = data.draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=m + 1, max_size=m + 1))
    extra = data.draw(st.floats(-5, 5, allow_nan=False))
    # U depends only on the coalition's size, plus a bonus for player m-1: players 0..m-2 are interchangeable.
    table = [by_size[mask.bit_count()] - by_size[0] + (extra if mask >> (m - 1) & 1 else 0.0) for mask in range(1 << m)]
    values = exact_shapley(table_game(m, table))
    np.testing.assert_allclose(values[:-1], values[0], atol=1e-9)
