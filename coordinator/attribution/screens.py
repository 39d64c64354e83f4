"""Screens that run before valuation and keep free riders and copies out of the coalition game.

Each screen records a reason and the measured quantity that triggered it, so a member can be told why. Screens
that exclude (non-finite, zero, norm outlier, stale, random direction) take the update out of the game entirely:
an excluded update has no coalition to improve and is valued 0. Near-duplicates are not excluded but merged into one
player whose value the group shares, so a copy earns nothing extra. A self-report that contradicts what the
coordinator observed is only flagged: valuation never reads self-reported counts, so the lie cannot change pay, but
it counts against reputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from coordinator.attribution.game import FloatVector

# Above this many candidates, near-duplicate search runs on a seeded random sketch and confirms candidates exactly
# (the full Gram matrix costs m^2 d; the sketch costs m d k with k = 128).
_SKETCH_ABOVE = 256
_SKETCH_DIMENSIONS = 128
_SKETCH_SEED = 0x5EED


class ScreenReason(StrEnum):
    NON_FINITE = "non_finite"
    ZERO_UPDATE = "zero_update"
    NORM_OUTLIER = "norm_outlier"
    STALE_UPDATE = "stale_update"
    RANDOM_DIRECTION = "random_direction"
    RANDOM_WEIGHTS = "random_weights"
    NEAR_DUPLICATE = "near_duplicate"
    SELF_REPORT_MISMATCH = "self_report_mismatch"


EXCLUDING_REASONS = frozenset(
    {
        ScreenReason.NON_FINITE,
        ScreenReason.ZERO_UPDATE,
        ScreenReason.NORM_OUTLIER,
        ScreenReason.STALE_UPDATE,
        ScreenReason.RANDOM_DIRECTION,
        ScreenReason.RANDOM_WEIGHTS,
    }
)


class ScreenSettings(BaseModel):
    """Thresholds of the screens; defaults are what the planted-behaviour tests run with.

    - zero_tolerance (1e-6): an update whose norm is below this fraction of the peers' median norm (or exactly 0
      without peers) equals the global model.
    - min_global_cosine (0.5): the returned parameters (global + update) must point roughly where the global model
      does; a training step keeps this cosine near 1, a freshly drawn random model gives about 0.
    - norm_ratio_limit (10.0): an update more than this many times the peers' median norm is an outlier (random
      weights are orders of magnitude larger than a training step).
    - stale_cosine (0.99): cosine with the previous round's global change at or above this is a replayed delta.
    - random_cosine_scale (4.0): |cosine| with the peers' consensus below scale/sqrt(d) is what a random direction
      gives; only applied when the peers themselves agree (median cosine above 3x that bound) and there are >= 3.
    - duplicate_cosine (0.999): pairs at or above this cosine are one player.
    - self_report_tolerance (0.1): relative difference allowed between reported and verified example counts.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    zero_tolerance: float = Field(default=1e-6, ge=0.0, lt=1.0)
    min_global_cosine: float = Field(default=0.5, ge=-1.0, le=1.0)
    norm_ratio_limit: float = Field(default=10.0, gt=1.0)
    stale_cosine: float = Field(default=0.99, gt=0.0, le=1.0)
    random_cosine_scale: float = Field(default=4.0, ge=0.0)
    duplicate_cosine: float = Field(default=0.999, gt=0.0, le=1.0)
    self_report_tolerance: float = Field(default=0.1, ge=0.0)


@dataclass(frozen=True)
class ScreenFlag:
    reason: ScreenReason
    measured: float

    @property
    def excludes(self) -> bool:
        return self.reason in EXCLUDING_REASONS


@dataclass(frozen=True)
class ScreenReport:
    """Flags per member index, and the players left for valuation: tuples of member indices (a tuple of more than
    one is a near-duplicate group), ordered by their smallest index."""

    flags: dict[int, list[ScreenFlag]] = field(default_factory=dict)
    players: list[tuple[int, ...]] = field(default_factory=list)

    def excluded(self, member: int) -> bool:
        return any(flag.excludes for flag in self.flags.get(member, []))


def _cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b)) / (na * nb)


def _near_duplicate_pairs(unit: npt.NDArray[np.float32], threshold: float) -> list[tuple[int, int]]:
    m = unit.shape[0]
    if m <= _SKETCH_ABOVE:
        gram = unit @ unit.T
        rows, cols = np.nonzero(np.triu(gram >= threshold, k=1))
        return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
    rng = np.random.default_rng(_SKETCH_SEED)
    projection = rng.standard_normal((unit.shape[1], _SKETCH_DIMENSIONS), dtype=np.float32)
    sketch = unit @ projection
    sketch /= np.maximum(np.linalg.norm(sketch, axis=1, keepdims=True), 1e-30)
    # Near-parallel vectors stay near-parallel under a random projection; 0.9 leaves a wide margin and every
    # candidate is confirmed on the full vectors.
    rows, cols = np.nonzero(np.triu(sketch @ sketch.T >= 0.9, k=1))
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if float(np.dot(unit[r], unit[c])) >= threshold]


def _groups(candidates: list[int], pairs: list[tuple[int, int]]) -> list[tuple[int, ...]]:
    parent = {c: c for c in candidates}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    grouped: dict[int, list[int]] = {}
    for c in candidates:
        grouped.setdefault(root(c), []).append(c)
    return sorted((tuple(sorted(g)) for g in grouped.values()), key=lambda g: g[0])


def screen_updates(
    deltas: FloatVector,
    *,
    settings: ScreenSettings,
    global_params: FloatVector | None = None,
    previous_global_delta: FloatVector | None = None,
    reported_examples: Sequence[int | None] | None = None,
    verified_examples: Sequence[int | None] | None = None,
) -> ScreenReport:
    """Screen the (m, d) matrix of observed updates (each member's parameters minus the global model)."""
    m, d = deltas.shape
    flags: dict[int, list[ScreenFlag]] = {i: [] for i in range(m)}

    finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(deltas).all(axis=1))
    safe = np.where(finite[:, None], deltas, 0.0).astype(np.float32)
    norms = np.linalg.norm(safe, axis=1).astype(np.float64)
    alive = [i for i in range(m) if bool(finite[i])]
    for i in range(m):
        if not finite[i]:
            flags[i].append(ScreenFlag(ScreenReason.NON_FINITE, 0.0))

    positive = [norms[i] for i in alive if norms[i] > 0.0]
    median_norm = float(np.median(positive)) if positive else 0.0
    for i in alive:
        if norms[i] == 0.0 or norms[i] <= settings.zero_tolerance * median_norm:
            flags[i].append(ScreenFlag(ScreenReason.ZERO_UPDATE, float(norms[i])))
    candidates = [i for i in alive if not flags[i]]

    if global_params is not None and float(np.linalg.norm(global_params)) > 0.0:
        for i in candidates:
            cosine = _cosine(global_params + safe[i], global_params)
            if cosine < settings.min_global_cosine:
                flags[i].append(ScreenFlag(ScreenReason.RANDOM_WEIGHTS, cosine))
        candidates = [i for i in candidates if not flags[i]]

    if len(candidates) >= 3:
        for i in candidates:
            peer_median = float(np.median([norms[j] for j in candidates if j != i]))
            ratio = norms[i] / peer_median
            if ratio > settings.norm_ratio_limit:
                flags[i].append(ScreenFlag(ScreenReason.NORM_OUTLIER, float(ratio)))
        candidates = [i for i in candidates if not flags[i]]

    if previous_global_delta is not None and float(np.linalg.norm(previous_global_delta)) > 0.0:
        for i in candidates:
            cosine = _cosine(safe[i], previous_global_delta)
            if cosine >= settings.stale_cosine:
                flags[i].append(ScreenFlag(ScreenReason.STALE_UPDATE, cosine))
        candidates = [i for i in candidates if not flags[i]]

    unit = np.zeros_like(safe)
    for i in candidates:
        unit[i] = safe[i] / norms[i]
    if len(candidates) >= 3 and settings.random_cosine_scale > 0.0:
        bound = settings.random_cosine_scale / np.sqrt(d)
        total = unit[candidates].sum(axis=0)
        consensus = {i: _cosine(unit[i], total - unit[i]) for i in candidates}
        for i in candidates:
            peers = float(np.median([consensus[j] for j in candidates if j != i]))
            if abs(consensus[i]) < bound and peers > 3 * bound:
                flags[i].append(ScreenFlag(ScreenReason.RANDOM_DIRECTION, consensus[i]))
        candidates = [i for i in candidates if not flags[i]]

    pairs = _near_duplicate_pairs(unit[candidates], settings.duplicate_cosine) if candidates else []
    players = _groups(candidates, [(candidates[a], candidates[b]) for a, b in pairs])
    for group in players:
        if len(group) > 1:
            for i in group:
                flags[i].append(ScreenFlag(ScreenReason.NEAR_DUPLICATE, float(len(group))))

    if reported_examples is not None and verified_examples is not None:
        for i, (reported, verified) in enumerate(zip(reported_examples, verified_examples, strict=True)):
            if reported is None or verified is None:
                continue
            gap = abs(reported - verified) / max(verified, 1)
            if gap > settings.self_report_tolerance:
                flags[i].append(ScreenFlag(ScreenReason.SELF_REPORT_MISMATCH, float(reported / max(verified, 1))))

    return ScreenReport(flags={i: f for i, f in flags.items() if f}, players=players)
