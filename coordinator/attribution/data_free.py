"""What a member could have sent without any data, and how far an update is from it.

A member without data still receives the global model θ_t every round and may remember the earlier ones. Everything
it can build from them lies in the span H of {θ_t, θ_{t-1}, ..., θ_{t-K}}: a scaled or shrunk copy of θ_t, a stale
model θ_{t-k} sent back, a mix of earlier global models, the last global step replayed or extrapolated. Its update
δ = θ' − θ_t then lies in H too, up to whatever noise it adds. An update from data has most of its energy outside H
(measured: at most 47 % inside H on PLAID and on the synthetic tasks of bench/adversary_bench.py, with K = 8).

Noise is the other data-free ingredient, and the part of an update outside H is judged against it: a residual that
is noise carries no information about the validation loss nor about what the other members learnt. `noise_z` is the
self-normalised statistic Σ r_j c_j / sqrt(Σ r_j² c_j²) of a residual r against a reference c: whatever the shape
of the noise (spread or concentrated on a few coordinates), if its signs are independent of c the statistic is about
N(0, 1), so a threshold on it means the same thing for every model size and member count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from coordinator.attribution.game import FloatVector

Basis = npt.NDArray[np.float64]
"""(k, d) orthonormal rows spanning what a data-free member can build; k may be 0."""

# A direction whose remaining norm after Gram-Schmidt is below this fraction of its own norm adds nothing to the span
# (e.g. a repeated global model): float32 parameters carry about 7 significant digits.
_INDEPENDENT = 1e-6


def data_free_basis(
    global_params: FloatVector | None,
    previous_global_delta: FloatVector | None = None,
    earlier_globals: Sequence[FloatVector] = (),
) -> Basis:
    """Orthonormal basis of span{θ_t, θ_t − θ_{t−1}, θ_{t−1}, θ_{t−2}, ...} (whichever are given), in float64."""
    directions: list[npt.NDArray[np.float64]] = []
    if global_params is not None:
        directions.append(np.asarray(global_params, dtype=np.float64))
    if previous_global_delta is not None:
        directions.append(np.asarray(previous_global_delta, dtype=np.float64))
    directions += [np.asarray(g, dtype=np.float64) for g in earlier_globals]
    rows: list[npt.NDArray[np.float64]] = []
    for direction in directions:
        remaining = direction.copy()
        for _ in range(2):  # twice: one pass of classical Gram-Schmidt loses orthogonality in float arithmetic
            for row in rows:
                remaining -= (row @ remaining) * row
        size = float(np.linalg.norm(remaining))
        if size > _INDEPENDENT * float(np.linalg.norm(direction)) and size > 0.0:
            rows.append(remaining / size)
    if not rows:
        width = 0 if not directions else directions[0].shape[0]
        return np.zeros((0, width))
    return np.stack(rows)


_ROW_CHUNK = 256


def residuals(basis: Basis, deltas: FloatVector) -> npt.NDArray[np.float64]:
    """Each row of `deltas` minus its projection on the span: the part no data-free member could have built
    (float64, computed a block of rows at a time so the only (m, d) array is the result)."""
    rows = np.array(deltas, dtype=np.float64)
    if basis.shape[0] == 0:
        return rows
    for start in range(0, rows.shape[0], _ROW_CHUNK):
        block = rows[start : start + _ROW_CHUNK]
        block -= (block @ basis.T) @ basis
    return rows


def explained_fraction(deltas: FloatVector, remaining: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Per row, the share of the update's energy that lies in the data-free span (1 − |residual|² / |update|²);
    0 for a zero row."""
    total = np.empty(deltas.shape[0])
    for start in range(0, deltas.shape[0], _ROW_CHUNK):
        block = np.asarray(deltas[start : start + _ROW_CHUNK], dtype=np.float64)
        total[start : start + _ROW_CHUNK] = np.einsum("ij,ij->i", block, block)
    left = np.einsum("ij,ij->i", remaining, remaining)
    safe = np.where(total > 0.0, total, 1.0)
    return np.where(total > 0.0, 1.0 - left / safe, 0.0)


def noise_z(residual: npt.NDArray[np.float64], reference: npt.NDArray[np.float64]) -> float:
    """Σ r_j c_j / sqrt(Σ r_j² c_j²): about N(0, 1) when the signs of r are independent of c; 0 when either is 0."""
    products = residual * reference
    spread = float(np.sqrt(np.sum(products**2)))
    if spread == 0.0:
        return 0.0
    return float(np.sum(products)) / spread


def noise_z_rows(residuals: npt.NDArray[np.float64], references: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """`noise_z` of each row of `residuals` against the matching row of `references` (or one row broadcast)."""
    products = residuals * references
    spread = np.sqrt(np.einsum("ij,ij->i", products, products))
    sums = products.sum(axis=1)
    return np.where(spread > 0.0, sums / np.where(spread > 0.0, spread, 1.0), 0.0)
