"""The coalition game of one training round: which subsets of updates make the global model better.

U(S) = L(global) - L(global + sum_{i in S} w_i * delta_i), where L is the buyer's validation loss and w_i are fixed
weights decided before valuation (1/m, or server-verified capped example counts normalised to sum 1). Fixed
weights matter: if the weights were renormalised per coalition, a player's presence would change the weight of every
other player and the marginal contribution would no longer be the player's own update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from protocol.errors import MalformedError

FloatVector = npt.NDArray[np.float32]
LossFunction = Callable[[FloatVector], float]


class CoalitionGame:
    """Utilities of coalitions of m players (bitmask-coded), each computed once and cached.

    `evaluations` counts calls of the loss function, i.e. distinct coalitions evaluated (the cost measure
    that the sampling budget and the benchmarks report).
    """

    def __init__(
        self,
        loss: LossFunction,
        global_params: FloatVector,
        deltas: FloatVector,
        weights: Sequence[float],
    ) -> None:
        if deltas.ndim != 2 or global_params.ndim != 1 or deltas.shape[1] != global_params.shape[0]:
            raise MalformedError(
                "deltas must be an (m, d) matrix matching the d parameters of the global model",
                deltas_shape=deltas.shape,
                global_shape=global_params.shape,
            )
        if len(weights) != deltas.shape[0]:
            raise MalformedError("one weight per player", players=deltas.shape[0], weights=len(weights))
        self._loss = loss
        self._global = global_params.astype(np.float32, copy=False)
        self._deltas = deltas.astype(np.float32, copy=False)
        self._weights = np.asarray(weights, dtype=np.float32)
        self._cache: dict[int, float] = {}
        self.players = int(deltas.shape[0])
        self.evaluations = 0
        self.base_loss = self._evaluate_loss(0)
        self._cache[0] = 0.0

    def _evaluate_loss(self, mask: int) -> float:
        coefficients = np.zeros(self.players, dtype=np.float32)
        for i in range(self.players):
            if mask >> i & 1:
                coefficients[i] = self._weights[i]
        params = self._global + coefficients @ self._deltas
        self.evaluations += 1
        return float(self._loss(params))

    def utility(self, mask: int) -> float:
        """U(S) for the coalition whose bit i is set when player i is in it. Requires 0 <= mask < 2**m."""
        cached = self._cache.get(mask)
        if cached is not None:
            return cached
        value = self.base_loss - self._evaluate_loss(mask)
        self._cache[mask] = value
        return value

    def is_cached(self, mask: int) -> bool:
        """True when U(mask) is known without another loss evaluation."""
        return mask in self._cache

    def grand_utility(self) -> float:
        """U(N), the utility of all players together."""
        return self.utility((1 << self.players) - 1)
