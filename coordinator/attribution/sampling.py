"""Permutation-sampling Shapley estimates with GTG-Shapley truncation (Liu et al., 2022).

Three things keep the number of utility evaluations small:
- between-round truncation: when the grand coalition barely moves the validation loss, the round is worth nothing
  to anyone and no coalition is evaluated beyond U(N);
- within-round truncation: once a permutation's prefix is within `within_epsilon` of U(N), the remaining players'
  marginals are taken as 0 without evaluating them (later players add almost nothing once the model is there);
- guided, antithetic permutations: pair k starts with player k mod m (so every player is measured early, where
  marginals are large), and each permutation is followed by its reverse, which cancels much of the position noise.
The standard error per player is computed over antithetic pairs, which are independent of each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from coordinator.attribution.game import CoalitionGame


@dataclass(frozen=True)
class SampledValues:
    values: npt.NDArray[np.float64]
    standard_errors: npt.NDArray[np.float64]
    pairs: int
    evaluations: int
    round_truncated: bool


class _BudgetSpent(Exception):
    pass


def _marginals(
    game: CoalitionGame, order: list[int], grand: float, within_epsilon: float, budget: int
) -> npt.NDArray[np.float64]:
    marginals = np.zeros(game.players)
    mask = 0
    previous = 0.0
    for position, player in enumerate(order):
        if abs(grand - previous) <= within_epsilon * abs(grand):
            break
        if position == game.players - 1:
            current = grand
        else:
            next_mask = mask | 1 << player
            if game.evaluations >= budget and not game.is_cached(next_mask):
                raise _BudgetSpent
            current = game.utility(next_mask)
        marginals[player] = current - previous
        mask |= 1 << player
        previous = current
    return marginals


def sampled_shapley(
    game: CoalitionGame,
    *,
    budget: int,
    seed: int,
    within_epsilon: float = 0.01,
    between_epsilon: float = 1e-4,
    convergence_tolerance: float = 0.01,
    min_passes: int = 2,
) -> SampledValues:
    """Estimate Shapley values within `budget` evaluations (counting U(empty) and U(N)); deterministic for `seed`.

    `between_epsilon` is relative to the global model's validation loss; `within_epsilon` relative to |U(N)|.
    Stops early when the last min(m, 10) pairs changed the estimates by less than `convergence_tolerance` on average
    (relative to the largest estimate), after at least `min_passes` such checks.
    """
    m = game.players
    zeros = np.zeros(m)
    if m == 0:
        return SampledValues(zeros, zeros, 0, game.evaluations, False)
    grand = game.grand_utility()
    if abs(grand) <= between_epsilon * max(abs(game.base_loss), 1e-12):
        return SampledValues(zeros, zeros, 0, game.evaluations, True)
    rng = np.random.default_rng(seed)
    samples: list[npt.NDArray[np.float64]] = []
    previous_estimate: npt.NDArray[np.float64] | None = None
    # Convergence is checked every `check_every` pairs: a full guided pass for small m, every 10 pairs for large m
    # (where one pass of m permutations would cost far more than any budget).
    check_every = min(m, 10)
    try:
        while game.evaluations < budget:
            first = len(samples) % m
            rest = [int(p) for p in rng.permutation([p for p in range(m) if p != first])]
            order = [first, *rest]
            forward = _marginals(game, order, grand, within_epsilon, budget)
            backward = _marginals(game, order[::-1], grand, within_epsilon, budget)
            samples.append((forward + backward) / 2)
            if len(samples) % check_every:
                continue
            estimate = np.mean(samples, axis=0)
            if previous_estimate is not None and len(samples) >= min_passes * check_every:
                scale = max(float(np.max(np.abs(estimate))), 1e-12)
                if float(np.mean(np.abs(estimate - previous_estimate))) / scale < convergence_tolerance:
                    break
            previous_estimate = estimate
    except _BudgetSpent:
        pass
    if not samples:
        # Budget too small for even one antithetic pair: fall back to the equal split of U(N), which is efficient.
        return SampledValues(np.full(m, grand / m), np.full(m, np.inf), 0, game.evaluations, False)
    stacked = np.asarray(samples)
    values = stacked.mean(axis=0)
    errors = stacked.std(axis=0, ddof=1) / np.sqrt(len(samples)) if len(samples) > 1 else np.full(m, np.inf)
    return SampledValues(values, errors, len(samples), game.evaluations, False)
