"""Exact Shapley values by enumerating every coalition (2**m utilities, each computed once)."""

from __future__ import annotations

from math import factorial

import numpy as np
import numpy.typing as npt

from coordinator.attribution.game import CoalitionGame
from protocol.errors import PolicyViolationError

EXACT_MAX_PLAYERS = 12


def exact_shapley(game: CoalitionGame) -> npt.NDArray[np.float64]:
    """phi_i = sum over S not containing i of |S|! (m-|S|-1)! / m! * (U(S + i) - U(S)). Requires m <= 12."""
    m = game.players
    if m > EXACT_MAX_PLAYERS:
        raise PolicyViolationError("exact Shapley is limited to 12 players", players=m, limit=EXACT_MAX_PLAYERS)
    if m == 0:
        return np.zeros(0)
    utilities = [game.utility(mask) for mask in range(1 << m)]
    coefficient = [factorial(s) * factorial(m - s - 1) / factorial(m) for s in range(m)]
    values = np.zeros(m)
    for mask in range(1 << m):
        size = mask.bit_count()
        for i in range(m):
            if not mask >> i & 1:
                values[i] += coefficient[size] * (utilities[mask | 1 << i] - utilities[mask])
    return values
