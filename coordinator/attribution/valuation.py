"""One round's valuation: screen the updates, build the coalition game over what is left, pick the method by size.

The method is chosen by the number of players m (after screens merged near-duplicates): exact Shapley for
m <= exact_max_players, GTG-style permutation sampling up to sampled_max_players, first-order values above. All
randomness comes from a seed derived from (settings.seed, round index), so a round's valuation is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from coordinator.attribution.first_order import GradientFunction, first_order_values
from coordinator.attribution.game import CoalitionGame, FloatVector, LossFunction
from coordinator.attribution.sampling import sampled_shapley
from coordinator.attribution.screens import ScreenFlag, ScreenReport, ScreenSettings, screen_updates
from coordinator.attribution.shapley import EXACT_MAX_PLAYERS, exact_shapley
from protocol.errors import MalformedError


class ValuationMethod(StrEnum):
    EXACT = "exact"
    SAMPLED = "sampled"
    FIRST_ORDER = "first_order"
    NONE = "none"


class ValuationSettings(BaseModel):
    """How rounds are valued.

    - exact_max_players (10, at most 12): exact Shapley up to this many players (2**m loss evaluations; 1,024 at
      m = 10 is about 7 s for the PLAID model on one core, 4,096 at m = 12 four times that).
    - sampled_max_players (50): permutation sampling up to this many (at most 25 m evaluations; at m = 50 the
      PLAID model's rounds stop after 3 antithetic pairs, about 290 evaluations); first-order values above, where
      each w_i = 1/m is small enough that the linearisation is accurate (bench/attribution_bench.py measures it
      against exact).
    - evaluations_per_player (25): sampling budget is this times m loss evaluations (25 % of 2**10 at m = 10).
    - within_epsilon (0.01), between_epsilon (1e-4): GTG-Shapley truncation; convergence_tolerance (0.01): sampling
      stops once the players' standard errors average less than this fraction of the largest value (after at least
      3 pairs), see coordinator.attribution.sampling.
    - example_count_cap (None): when set, and the coordinator verified each member's example count, weights are the
      verified counts capped at this value (normalised); otherwise every player weighs 1/m. Self-reported counts
      are never used.
    - seed (0): root of the per-round sampling seed.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    exact_max_players: int = Field(default=10, ge=0, le=EXACT_MAX_PLAYERS)
    sampled_max_players: int = Field(default=50, ge=0)
    evaluations_per_player: int = Field(default=25, ge=1)
    within_epsilon: float = Field(default=0.01, ge=0.0)
    between_epsilon: float = Field(default=1e-4, ge=0.0)
    convergence_tolerance: float = Field(default=0.01, ge=0.0)
    example_count_cap: int | None = Field(default=None, ge=1)
    seed: int = Field(default=0, ge=0)
    screens: ScreenSettings = Field(default_factory=ScreenSettings)


@dataclass(frozen=True)
class RoundUpdates:
    """What the strategy observed in one round: member ids, the global model it sent, and the (m, d) matrix of
    updates it received (member parameters minus global). Example counts are optional; `verified_examples` are the
    counts the coordinator checked itself (never the device's claim). `earlier_globals` are the global models of
    earlier rounds, most recent first, and `previous_global_delta` the last global step: what a member without data
    could build its update from (data_free.py). `reported_losses` are the members' own (before, after) training
    loss claims, never trusted, only checked against the update. `previous_updates` are each member's own update of
    the previous round (None for a member that sent none): an update that keeps learning the same data is not noise
    (screens: random direction). `previous_groups` are the previous round's players of more than one member (member
    ids): same data persists, so such a pair stays one player at a lower similarity (screens: same data). `owners`
    name the member each update's device belongs to (None: each update is its own member's): one member's devices
    are one player (screens: `owners`). `evidenced` says whether each member showed evidence of data in an earlier
    round (the union of the earlier rounds' `RoundValuation.evidenced`; None: all did): the random-direction screen
    rescues only such a member for persisting."""

    round_index: int
    members: Sequence[str]
    global_params: FloatVector
    updates: FloatVector
    reported_examples: Sequence[int | None] | None = None
    verified_examples: Sequence[int | None] | None = None
    previous_global_delta: FloatVector | None = None
    earlier_globals: Sequence[FloatVector] = ()
    reported_losses: Sequence[tuple[float, float] | None] | None = None
    previous_updates: Sequence[FloatVector | None] | None = None
    previous_groups: Sequence[Sequence[str]] = ()
    owners: Sequence[str] | None = None
    evidenced: Sequence[bool] | None = None


@dataclass(frozen=True)
class RoundValuation:
    """One round's values, flags and players (member ids); `similarities` are the same-data similarities the
    screens reported (ScreenReport.similarities) by pair of member ids in sorted order: the evidence the job's
    account accumulates (history.AttributionAccount). `clipped` maps a member whose update was longer than the norm
    limit to the factor its update was valued at, and is to be aggregated at (ScreenReport.clipped); `combined` maps
    each device of a player made of one member's devices to the factor, on top of its clip and its weight, that
    makes the player's update their sum (ScreenReport.combined); `evidenced` the members that showed evidence of
    data in this round (ScreenReport.evidenced), for the next rounds' `RoundUpdates.evidenced`."""

    round_index: int
    method: ValuationMethod
    values: dict[str, float]
    standard_errors: dict[str, float]
    flags: dict[str, list[ScreenFlag]]
    players: list[tuple[str, ...]]
    evaluations: int
    grand_utility: float
    base_loss: float
    weights: dict[str, float] = field(default_factory=dict)
    similarities: dict[tuple[str, str], float] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    combined: dict[str, float] = field(default_factory=dict)
    evidenced: frozenset[str] = frozenset()


def round_seed(root: int, round_index: int) -> int:
    """The sampling seed of one round, independent of every other round's."""
    return int(np.random.SeedSequence([root, round_index]).generate_state(1)[0])


def _player_weights(
    players: list[tuple[int, ...]], verified: Sequence[int | None] | None, cap: int | None
) -> list[float]:
    if cap is not None and verified is not None and all(verified[i] is not None for g in players for i in g):
        # A near-duplicate group carries the data of one member, so it weighs as one member.
        raw = [float(min(max(int(verified[i] or 0) for i in group), cap)) for group in players]
        total = sum(raw)
        if total > 0:
            return [r / total for r in raw]
    return [1.0 / len(players)] * len(players) if players else []


def _check(updates: RoundUpdates) -> None:
    m = len(updates.members)
    if updates.updates.ndim != 2 or updates.updates.shape[0] != m:
        raise MalformedError("one update row per member", members=m, updates_shape=updates.updates.shape)
    if updates.global_params.ndim != 1 or updates.global_params.shape[0] != updates.updates.shape[1]:
        raise MalformedError(
            "updates and global model differ in size",
            global_shape=updates.global_params.shape,
            updates_shape=updates.updates.shape,
        )
    if len(set(updates.members)) != m:
        raise MalformedError("member ids must be unique", members=m, unique=len(set(updates.members)))
    for name, counts in (("reported", updates.reported_examples), ("verified", updates.verified_examples)):
        if counts is not None and len(counts) != m:
            raise MalformedError(f"one {name} example count per member", members=m, counts=len(counts))
    if updates.owners is not None and len(updates.owners) != m:
        raise MalformedError("one owner per member", members=m, owners=len(updates.owners))
    if updates.evidenced is not None and len(updates.evidenced) != m:
        raise MalformedError("one evidence flag per member", members=m, evidenced=len(updates.evidenced))
    if updates.reported_losses is not None and len(updates.reported_losses) != m:
        raise MalformedError("one reported loss pair per member", members=m, losses=len(updates.reported_losses))
    if updates.previous_updates is not None:
        if len(updates.previous_updates) != m:
            raise MalformedError(
                "one previous update (or None) per member", members=m, found=len(updates.previous_updates)
            )
        for previous in updates.previous_updates:
            if previous is not None and previous.shape != updates.global_params.shape:
                raise MalformedError(
                    "a previous update differs in size", global_shape=updates.global_params.shape, found=previous.shape
                )
    for earlier in updates.earlier_globals:
        if earlier.shape != updates.global_params.shape:
            raise MalformedError(
                "an earlier global model differs in size", global_shape=updates.global_params.shape, found=earlier.shape
            )


@dataclass(frozen=True)
class _PlayerValues:
    method: ValuationMethod
    values: npt.NDArray[np.float64]
    errors: npt.NDArray[np.float64]
    evaluations: int
    grand: float
    base_loss: float


def _value_players(
    updates: RoundUpdates,
    deltas: FloatVector,
    weights: list[float],
    loss: LossFunction,
    settings: ValuationSettings,
    validation_gradient: FloatVector | None,
) -> _PlayerValues:
    m = deltas.shape[0]
    zeros = np.zeros(m)
    if m == 0:
        return _PlayerValues(ValuationMethod.NONE, zeros, zeros, 0, 0.0, float("nan"))
    if m > settings.sampled_max_players:
        if validation_gradient is None:
            raise MalformedError("first-order valuation needs a validation gradient", players=m)
        gradient = validation_gradient
        values = first_order_values(lambda _: gradient, updates.global_params, deltas, weights)
        return _PlayerValues(ValuationMethod.FIRST_ORDER, values, zeros, 0, float(values.sum()), float("nan"))
    game = CoalitionGame(loss, updates.global_params, deltas, weights)
    if m <= settings.exact_max_players:
        method, values, errors = ValuationMethod.EXACT, exact_shapley(game), zeros
    else:
        sampled = sampled_shapley(
            game,
            budget=settings.evaluations_per_player * m,
            seed=round_seed(settings.seed, updates.round_index),
            within_epsilon=settings.within_epsilon,
            between_epsilon=settings.between_epsilon,
            convergence_tolerance=settings.convergence_tolerance,
        )
        method, values, errors = ValuationMethod.SAMPLED, sampled.values, sampled.standard_errors
    return _PlayerValues(method, values, errors, game.evaluations, game.grand_utility(), game.base_loss)


def _grouped_before(updates: RoundUpdates) -> list[tuple[int, int]]:
    """Index pairs of this round's members that were in one player of the previous round (members absent now are
    left out)."""
    index = {member: i for i, member in enumerate(updates.members)}
    pairs = []
    for group in updates.previous_groups:
        present = sorted(index[member] for member in group if member in index)
        pairs += [(a, b) for k, a in enumerate(present) for b in present[k + 1 :]]
    return pairs


def value_round(
    updates: RoundUpdates,
    loss: LossFunction,
    settings: ValuationSettings,
    gradient: GradientFunction | None = None,
) -> RoundValuation:
    """Screen, then value each member's update in this round; excluded members get 0 and weight 0, a group's
    members share its value and its weight by their shares (screens.ScreenReport.shares), a norm outlier's update is
    valued clipped to the limit (screens.ScreenReport.clipped), one member's devices as the sum of their updates
    (screens.ScreenReport.combined).

    `gradient`, when given, is evaluated once at the global model: the screens judge residuals against it, and above
    `sampled_max_players` it gives the first-order values.
    """
    _check(updates)
    validation_gradient = None if gradient is None else gradient(updates.global_params)
    report: ScreenReport = screen_updates(
        updates.updates,
        settings=settings.screens,
        global_params=updates.global_params,
        previous_global_delta=updates.previous_global_delta,
        earlier_globals=updates.earlier_globals,
        validation_gradient=validation_gradient,
        reported_examples=updates.reported_examples,
        verified_examples=updates.verified_examples,
        reported_losses=updates.reported_losses,
        previous_updates=updates.previous_updates,
        grouped_before=_grouped_before(updates),
        owners=updates.owners,
        evidenced=updates.evidenced,
    )
    players = report.players
    weights = _player_weights(players, updates.verified_examples, settings.example_count_cap)
    # A group is one member's data: valued (and aggregated) as its members' updates weighed by their shares. A
    # player alone (share 1) is its update as it is (clipped if it was a norm outlier): one gather for all of them,
    # a sum only for the groups.
    deltas = np.asarray(updates.updates[[group[0] for group in players]], dtype=np.float32)
    for p, group in enumerate(players):
        if len(group) > 1:
            deltas[p] = sum(
                report.shares[i]
                * report.clipped.get(i, 1.0)
                * report.combined.get(i, 1.0)
                * updates.updates[i].astype(np.float64)
                for i in group
            )
        elif group[0] in report.clipped:
            deltas[p] *= np.float32(report.clipped[group[0]])

    outcome = _value_players(updates, deltas, weights, loss, settings, validation_gradient)

    values = dict.fromkeys(updates.members, 0.0)
    errors = dict.fromkeys(updates.members, 0.0)
    member_weights = dict.fromkeys(updates.members, 0.0)
    for p, group in enumerate(players):
        for i in group:
            share = report.shares[i]
            values[updates.members[i]] = float(outcome.values[p]) * share
            errors[updates.members[i]] = float(outcome.errors[p]) * share
            member_weights[updates.members[i]] = weights[p] * share
    return RoundValuation(
        round_index=updates.round_index,
        method=outcome.method,
        values=values,
        standard_errors=errors,
        flags={updates.members[i]: f for i, f in report.flags.items()},
        players=[tuple(updates.members[i] for i in group) for group in players],
        evaluations=outcome.evaluations,
        grand_utility=outcome.grand,
        base_loss=outcome.base_loss,
        weights=member_weights,
        similarities={_member_pair(updates.members, a, b): v for (a, b), v in report.similarities.items()},
        clipped={updates.members[i]: f for i, f in report.clipped.items()},
        combined={updates.members[i]: f for i, f in report.combined.items()},
        evidenced=frozenset(updates.members[i] for i in report.evidenced),
    )


def _member_pair(members: Sequence[str], a: int, b: int) -> tuple[str, str]:
    first, second = sorted((members[a], members[b]))
    return first, second
