"""First-order values: one validation gradient and m dot products, for rounds with very many players.

To first order U(S) ~ -g . sum_{i in S} w_i delta_i with g the validation-loss gradient at the global model. That
game is additive, so its Shapley value is exactly phi_i = -w_i g . delta_i, and the values satisfy efficiency for
the linearised game. The error is second order in the update size, which is small when every w_i ~ 1/m is small,
i.e. exactly in the large-m regime this method is used for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from coordinator.attribution.game import FloatVector

GradientFunction = Callable[[FloatVector], FloatVector]


def first_order_values(
    gradient: GradientFunction, global_params: FloatVector, deltas: FloatVector, weights: Sequence[float]
) -> npt.NDArray[np.float64]:
    """phi_i = -w_i * (grad L(global) . delta_i), computed as one matrix-vector product."""
    g = np.asarray(gradient(global_params), dtype=np.float32)
    projections = deltas.astype(np.float32, copy=False) @ g
    return -np.asarray(weights, dtype=np.float64) * projections.astype(np.float64)
