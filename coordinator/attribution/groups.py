"""Which updates carry the same data, and how a group of them shares one member's value.

Two links put members in one group (one player of the coalition game, weighing as one member):
- near-duplicates: cosine of the updates >= `duplicate_cosine` (0.999): a copy, scaled or not;
- same data: the parts of two updates that no data-free member could build (data_free.residuals) point the same way
  once what every member learnt is taken out. For a pair (i, j) the common part is the mean unit residual of the
  other members; the pair's similarity is the cosine of the two unit residuals minus that mean. Training the same
  data with another shuffling seed keeps it high (PLAID, 30-110 recordings: 0.51-0.77; synthetic tasks: >= 0.82),
  members with different data keep it low (PLAID <= 0.47; synthetic <= 0.81 only for members drawing the same classes
  from the same distribution). bench/adversary_bench.py measures both.

A group's members are paid by how much of the group's data each carries. Two copies of one update are
indistinguishable, but a partial copy is not: a copycat that sends half of a member's update is shorter than an
update from that data. Each member's share is ∝ min(s, typical)^falloff, s its size along the group's direction and
typical the round's typical update size (the median norm of the updates outside the group): a shrunk copy takes
little (at falloff 8, a half-size copy of a typical update takes 0.5^8 / (1 + 0.5^8) = 0.4 % of the group), and a
copy scaled up beyond the typical size gains nothing over the original.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from coordinator.attribution.game import FloatVector

# Above this many candidates, pair search runs on a seeded random sketch and confirms candidates exactly (the full
# Gram matrix costs m^2 d; the sketch costs m d k with k = 256).
SKETCH_ABOVE = 256
_SKETCH_DIMENSIONS = 256
_SKETCH_SEED = 0x5EED
# A sketched cosine is within about 3 / sqrt(k) = 0.19 of the true one (k = 256): candidates this far below a
# threshold are confirmed exactly, the rest are not pairs.
_SKETCH_MARGIN = 0.2


def _sketch(unit: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(_SKETCH_SEED)
    projection = rng.standard_normal((unit.shape[1], _SKETCH_DIMENSIONS), dtype=np.float32)
    sketch = np.asarray(unit, dtype=np.float32) @ projection
    sketch /= np.maximum(np.linalg.norm(sketch, axis=1, keepdims=True), 1e-30)
    return sketch


def _approximate_gram(unit: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    if unit.shape[0] <= SKETCH_ABOVE:
        exact = np.asarray(unit, dtype=np.float64)
        return exact @ exact.T
    sketch = _sketch(unit)
    return np.asarray(sketch @ sketch.T, dtype=np.float64)


def _exact_cosines(
    unit: npt.NDArray[np.floating], rows: npt.NDArray[np.intp], cols: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    """unit[r] · unit[c] for each candidate pair the sketch found, from one matrix product over the rows involved
    (not one full-length dot product per pair: a round of copies has tens of thousands of candidates)."""
    involved, inverse = np.unique(np.concatenate([rows, cols]), return_inverse=True)
    block = np.asarray(unit[involved], dtype=np.float32)
    gram = block @ block.T
    return np.asarray(gram[inverse[: rows.shape[0]], inverse[rows.shape[0] :]], dtype=np.float64)


def near_duplicate_pairs(unit: npt.NDArray[np.float64], threshold: float) -> list[tuple[int, int]]:
    """Index pairs (a < b) of unit rows whose cosine is >= threshold."""
    if unit.shape[0] < 2:
        return []
    gram = _approximate_gram(unit)
    exact = unit.shape[0] <= SKETCH_ABOVE
    margin = 0.0 if exact else _SKETCH_MARGIN
    rows, cols = np.nonzero(np.triu(gram >= threshold - margin, k=1))
    if not exact and rows.size:
        keep = _exact_cosines(unit, rows, cols) >= threshold
        rows, cols = rows[keep], cols[keep]
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]


def _centred_similarity(
    gram: npt.NDArray[np.float64], to_sum: npt.NDArray[np.float64], sum_square: float, others: int
) -> npt.NDArray[np.float64]:
    """Cosine of u_i − M and u_j − M, M the mean of the other `others` unit rows, for every pair at once (from the
    Gram matrix, each row's dot product with the sum of all rows, and the sum's squared norm)."""
    return _centred_terms(gram, to_sum[:, None], to_sum[None, :], sum_square, others)


def _centred_terms(
    gram: npt.NDArray[np.float64],
    s_i: npt.NDArray[np.float64],
    s_j: npt.NDArray[np.float64],
    sum_square: float,
    others: int,
) -> npt.NDArray[np.float64]:
    """The centred similarity from cosines G_ij and row sums s_i, s_j: every pair of a Gram matrix (s_i a column,
    s_j a row) or a list of pairs (all three aligned vectors)."""
    # u_i·M = (s_i − 1 − G_ij) / n; M·M = (S·S − 2 s_i − 2 s_j + 2 + 2 G_ij) / n²
    i_dot_m = (s_i - 1.0 - gram) / others
    j_dot_m = (s_j - 1.0 - gram) / others
    m_dot_m = (sum_square - 2.0 * s_i - 2.0 * s_j + 2.0 + 2.0 * gram) / others**2
    cross = gram - i_dot_m - j_dot_m + m_dot_m
    norm_i = np.maximum(1.0 - 2.0 * i_dot_m + m_dot_m, 1e-30)
    norm_j = np.maximum(1.0 - 2.0 * j_dot_m + m_dot_m, 1e-30)
    return np.asarray(cross / np.sqrt(norm_i * norm_j))


def same_data_pairs(unit_residuals: npt.NDArray[np.float64], threshold: float) -> list[tuple[int, int, float]]:
    """Pairs (a < b, similarity) of unit residual rows whose leave-pair-out centred similarity is >= threshold.
    Requires at least 4 rows (with fewer, the other members' mean is too thin to take the common part out)."""
    m = unit_residuals.shape[0]
    if m < 4:
        return []
    total = unit_residuals.sum(axis=0)
    to_sum = unit_residuals @ total
    sum_square = float(total @ total)
    exact = m <= SKETCH_ABOVE
    gram = _approximate_gram(unit_residuals)
    similarity = _centred_similarity(gram, to_sum, sum_square, m - 2)
    margin = 0.0 if exact else _SKETCH_MARGIN
    rows, cols = np.nonzero(np.triu(similarity >= threshold - margin, k=1))
    if exact:
        values = similarity[rows, cols]
    elif rows.size:
        cosines = _exact_cosines(unit_residuals, rows, cols)
        values = _centred_terms(cosines, to_sum[rows], to_sum[cols], sum_square, m - 2)
    else:
        values = np.zeros(0)
    keep = values >= threshold
    return [(int(r), int(c), float(v)) for r, c, v in zip(rows[keep], cols[keep], values[keep], strict=True)]


def pair_similarities(unit_residuals: npt.NDArray[np.float64], pairs: list[tuple[int, int]]) -> npt.NDArray[np.float64]:
    """The leave-pair-out centred similarity of the listed pairs of unit residual rows (as same_data_pairs measures
    it), computed exactly for these pairs only; 0 for every pair when there are fewer than 4 rows."""
    m = unit_residuals.shape[0]
    if m < 4 or not pairs:
        return np.zeros(len(pairs))
    total = unit_residuals.sum(axis=0)
    to_sum = unit_residuals @ total
    rows = np.array([a for a, _ in pairs], dtype=np.intp)
    cols = np.array([b for _, b in pairs], dtype=np.intp)
    cosines = _exact_cosines(unit_residuals, rows, cols)
    return _centred_terms(cosines, to_sum[rows], to_sum[cols], float(total @ total), m - 2)


def group_shares(deltas: FloatVector, group: tuple[int, ...], typical_norm: float, falloff: float) -> list[float]:
    """Each member's share of its group (summing to 1), ∝ min(size along the group's direction, `typical_norm`) **
    falloff; equal shares when the sizes cannot be told apart (the median size stands in when no typical size is
    known)."""
    rows = np.asarray(deltas[list(group)], dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1)
    direction = (rows / np.maximum(norms[:, None], 1e-30)).sum(axis=0)
    length = float(np.linalg.norm(direction))
    if length == 0.0:
        return [1.0 / len(group)] * len(group)
    sizes = np.maximum(rows @ (direction / length), 0.0)
    typical = typical_norm if typical_norm > 0.0 else float(np.median(sizes))
    if typical <= 0.0:
        return [1.0 / len(group)] * len(group)
    raw = np.minimum(sizes / typical, 1.0) ** falloff
    total = float(raw.sum())
    if total <= 0.0:
        return [1.0 / len(group)] * len(group)
    return [float(r / total) for r in raw]
