"""Screens that run before valuation and keep free riders and copies out of the coalition game.

Each screen records a reason and the measured quantity that triggered it, so a member can be told why. They run in
an order that keeps the consensus honest (issue 17):
1. screens that judge an update on its own: non-finite, zero (the global model sent back), random weights (a model
   unrelated to the one sent), a replay of the last global step, and data-free (data_free.py: an update that lies
   in what the global models alone can build — a scaled, shrunk or stale copy, a mix of earlier global models);
2. grouping (groups.py): near-duplicates and updates from the same data become one player, so a copy counts once in
   every consensus below and in the game;
3. random direction: a player whose residual is noise against both the other players and the validation gradient,
   only in a round where the other players agree with one another, and whose members do not keep learning what
   they learnt in the previous round (data persists from round to round, fresh noise does not);
4. members: the players holding devices of one member only (`owners`) become one, whatever their updates: a member
   is one player of a job, and a second device training the member's data again earns nothing twice however much
   noise hides it (issue 17: the noisy same-data node). After the screens, so that each device is screened on its
   own; a device the data links joined with another member's stays with it (a copy is shared by size).
The norm outlier screen runs between 1 and 2: it compares with the median norm, which a few copies do not move,
and excludes no one: an update longer than the limit is clipped to it (`ScreenReport.clipped`), valued and
aggregated at that length. An honest member holding far more data than the median takes more local steps and may
be longer than the limit without verified example counts to raise it (issue 17: never exclude the honest for being
different); a boosted update gains nothing a member just under the limit does not have.
Excluded updates take no part in the game and get aggregation weight 0. The screens of step 1 except non-finite
prove that an update carries no data (`DATA_FREE_PROOFS`): settlement pays nothing to a member they excluded in most
of its rounds. Consensus screens prove nothing about data (an honest member can simply be different), so a member
they exclude keeps the value of the rounds where it was admitted. A self-report that contradicts what the coordinator
observed, or a training loss reported for an update that is data-free, is only flagged: it costs reputation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from coordinator.attribution.data_free import data_free_basis, explained_fraction, noise_z_rows, residuals
from coordinator.attribution.game import FloatVector
from coordinator.attribution.groups import group_shares, near_duplicate_pairs, pair_similarities, same_data_pairs
from protocol.job_attribution import union_groups


class ScreenReason(StrEnum):
    NON_FINITE = "non_finite"
    ZERO_UPDATE = "zero_update"
    NORM_OUTLIER = "norm_outlier"
    STALE_UPDATE = "stale_update"
    DATA_FREE = "data_free"
    RANDOM_DIRECTION = "random_direction"
    RANDOM_WEIGHTS = "random_weights"
    NEAR_DUPLICATE = "near_duplicate"
    SAME_DATA = "same_data"
    SAME_MEMBER = "same_member"
    SELF_REPORT_MISMATCH = "self_report_mismatch"
    LOSS_CLAIM_UNSUPPORTED = "loss_claim_unsupported"


EXCLUDING_REASONS = frozenset(
    {
        ScreenReason.NON_FINITE,
        ScreenReason.ZERO_UPDATE,
        ScreenReason.STALE_UPDATE,
        ScreenReason.DATA_FREE,
        ScreenReason.RANDOM_DIRECTION,
        ScreenReason.RANDOM_WEIGHTS,
    }
)
DATA_FREE_PROOFS = frozenset(
    {ScreenReason.ZERO_UPDATE, ScreenReason.RANDOM_WEIGHTS, ScreenReason.STALE_UPDATE, ScreenReason.DATA_FREE}
)
"""Screens whose finding needs no other member: the update is provably not trained from the global model on data.
coordinator.royalties.settlement keeps the same names (it does not import numpy)."""


class ScreenSettings(BaseModel):
    """Thresholds of the screens; defaults are what the planted-behaviour tests and bench/adversary_bench.py run with.

    - zero_tolerance (1e-6): an update whose norm is below this fraction of the peers' median norm (or exactly 0
      without peers) equals the global model.
    - min_global_cosine (0.5): the returned parameters (global + update) must point roughly where the global model
      does; a training step keeps this cosine near 1, a freshly drawn random model gives about 0. The bound is scaled by
      the median update's cosine when that is below 1 (a first step from a small initial model may turn it more).
    - norm_ratio_limit (10.0): an update more than this many times the others' median norm is an outlier, clipped
      to this length (random weights, orders of magnitude larger than a training step, are excluded by
      min_global_cosine before); with verified example counts the limit grows with the update's count over the
      median count (more data, more local steps, a longer update).
    - stale_cosine (0.99): cosine with the previous round's global change at or above this is a replayed step.
    - data_free_explained (0.95): an update with at least this share of its energy in the span of the current and
      earlier global models is data-free (updates from data: at most 0.47 in bench/adversary_bench.py).
    - history_rounds (8): how many earlier global models that span includes (the sink keeps this many).
    - noise_z (3.0): a residual whose |noise_z| against the other players' consensus and against the validation
      gradient are both below this is indistinguishable from noise (data_free.noise_z is about N(0, 1) for noise:
      fresh noise passes one round in 190). Honest members far from the others fall below it in later rounds
      (PLAID, 5 members: 1.06 in round 3), and persistence_z is what keeps them in; in round 1 they measured >= 5.5.
    - consensus_z (6.0): the random-direction screen only runs when the other players' median evidence (the larger
      |noise_z| of the two) is at least this: where they are noise-like too, being different proves nothing.
    - persistence_z (4.0): a member whose residual has noise_z at least this against the residual of its own update
      of the previous round keeps learning the same data and is not noise (honest PLAID members: >= 23; fresh noise:
      about N(0, 1), so at 4 one noise update in 16,000 passes by chance), provided it showed evidence of data in an
      earlier round (noise_z at least `noise_z` against the consensus or the gradient): one noise direction sent
      every round persists too, and never shows it. 0 turns the rescue off.
    - duplicate_cosine (0.999): pairs at or above this cosine are one player.
    - same_data_similarity (0.5): pairs whose centred residual similarity (groups.py) is at or above this trained the
      same data: one player. 1.0 turns the test off.
    - same_data_persisting (0.42): a pair that was one player in the previous round stays one when its similarity
      is at or above this. The same data is the same every round but one round's similarity is noisy (PLAID, a node
      training 70 % of a member's data: 0.43-0.45 in a round between rounds of 0.56-0.68); pairs of PLAID members
      with different data reached 0.47 in a round and never the 0.5 that groups them first. The cost: a pair of
      honest members grouped once stays grouped more easily (synthetic, 5 members: 60 honest pairs grouped in 1,710
      member-rounds instead of 54). 1.0 turns it off.
    - same_data_reference (0.45) and same_data_evidence (0.3): the job-level grouping (history.AttributionAccount).
      Each round a pair's similarity s adds s - same_data_reference to a running sum that never drops below 0 (a
      CUSUM); a pair whose sum reaches same_data_evidence anywhere in the job trained the same data. Pairs of
      PLAID members with different data averaged <= 0.41 over a job (one pair 0.35-0.47 every round: its sum stays
      <= 0.02); same-data pairs >= 0.54 (seeds 0-2: sums 0.36-1.22 by the 4th round). 1.0 as the reference turns it
      off.
    - same_data_linked (0.3): such a job pair is paid as one member in every round of the job where its similarity
      is at least this. One round's similarity of a same-data pair dips (PLAID, 10 members: a node training 70 % of
      a member's data at 0.39 in a round between rounds of 0.56-0.63, as low as pairs with different data reach);
      only the job's evidence tells them apart, and a pair of honest members it joined by mistake (synthetic world,
      classes no one else holds) keeps its own pay in the rounds where it is unlike. Pairs at or above the lower of
      same_data_reference and same_data_persisting are reported each round (ScreenReport.similarities), and below it
      down to same_data_linked a pair whose members are each other's most similar (at most one per member: at 1,000
      members of PLAID data, 3,430 pairs reach 0.3 in a round against 142 at 0.42, and the round's ledger leaf lists
      them all); below, a pair counts as 0.
    - copy_falloff (8.0): a group member's share is ∝ min(its size, the typical size) ** copy_falloff (groups.py):
      a half-size copy of a typical update takes 0.5^8 / (1 + 0.5^8) = 0.4 % of the group.
    - self_report_tolerance (0.1): relative difference allowed between reported and verified example counts.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    zero_tolerance: float = Field(default=1e-6, ge=0.0, lt=1.0)
    min_global_cosine: float = Field(default=0.5, ge=-1.0, le=1.0)
    norm_ratio_limit: float = Field(default=10.0, gt=1.0)
    stale_cosine: float = Field(default=0.99, gt=0.0, le=1.0)
    data_free_explained: float = Field(default=0.95, gt=0.0, le=1.0)
    history_rounds: int = Field(default=8, ge=0, le=64)
    noise_z: float = Field(default=3.0, ge=0.0)
    consensus_z: float = Field(default=6.0, ge=0.0)
    persistence_z: float = Field(default=4.0, ge=0.0)
    duplicate_cosine: float = Field(default=0.999, gt=0.0, le=1.0)
    same_data_similarity: float = Field(default=0.5, gt=0.0, le=1.0)
    same_data_persisting: float = Field(default=0.42, gt=0.0, le=1.0)
    same_data_reference: float = Field(default=0.45, ge=0.0, le=1.0)
    same_data_evidence: float = Field(default=0.3, gt=0.0)
    same_data_linked: float = Field(default=0.3, gt=0.0, le=1.0)
    copy_falloff: float = Field(default=8.0, ge=0.0)
    self_report_tolerance: float = Field(default=0.1, ge=0.0)


@dataclass(frozen=True)
class ScreenFlag:
    reason: ScreenReason
    measured: float

    @property
    def excludes(self) -> bool:
        return self.reason in EXCLUDING_REASONS

    @property
    def proves_data_free(self) -> bool:
        return self.reason in DATA_FREE_PROOFS


@dataclass(frozen=True)
class ScreenReport:
    """Flags per member index, the players left for valuation (tuples of member indices, a tuple of more than one
    being a group of copies or of the same data, ordered by their smallest index), and each admitted member's share
    of its player (1.0 alone; a group's shares sum to 1). `similarities` holds the same-data similarity (groups.py)
    of every pair (a < b) of members left after the own screens at or above the lower of `same_data_reference` and
    `same_data_persisting`, and of a pair down to `same_data_linked` whose members are each other's most similar: the
    round's evidence for a grouping over the whole job. `clipped` maps each norm outlier to the factor (< 1) that
    brings its update to the limit: the screens after it, the game and the aggregation see the update so scaled.
    `evidenced` are the members whose player showed evidence of data this round (the random-direction screen's
    noise_z at least `noise_z` against the others' consensus or the validation gradient): what the caller keeps
    for the next rounds' `evidenced`.
    `combined` maps each device of a player that is one member's devices alone (`owners`) to the factor (times its
    share) its update is valued and aggregated at: the player's update is the sum of its parts' updates, no longer
    than the longest part or the round's typical update (`_member_player`)."""

    flags: dict[int, list[ScreenFlag]] = field(default_factory=dict)
    players: list[tuple[int, ...]] = field(default_factory=list)
    shares: dict[int, float] = field(default_factory=dict)
    similarities: dict[tuple[int, int], float] = field(default_factory=dict)
    clipped: dict[int, float] = field(default_factory=dict)
    combined: dict[int, float] = field(default_factory=dict)
    evidenced: frozenset[int] = frozenset()

    def excluded(self, member: int) -> bool:
        return any(flag.excludes for flag in self.flags.get(member, []))


_ROW_CHUNK = 256
"""Rows per block when a screen needs an (m, d) temporary: bounds its memory to 256 d floats whatever m is."""


def _row_dots(matrix: npt.NDArray[np.generic], vector: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """Each row's dot product with `vector`, accumulated in float64 (a block of rows at a time)."""
    reference = np.asarray(vector, dtype=np.float64)
    out = np.empty(matrix.shape[0])
    for start in range(0, matrix.shape[0], _ROW_CHUNK):
        out[start : start + _ROW_CHUNK] = np.asarray(matrix[start : start + _ROW_CHUNK], dtype=np.float64) @ reference
    return out


def _row_norms(matrix: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """Each row's Euclidean norm, accumulated in float64 (a block of rows at a time)."""
    out = np.empty(matrix.shape[0])
    for start in range(0, matrix.shape[0], _ROW_CHUNK):
        block = np.asarray(matrix[start : start + _ROW_CHUNK], dtype=np.float64)
        out[start : start + _ROW_CHUNK] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def leave_one_out_medians(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """For each i, the median of `values` without element i (np.median of the other n - 1), from one sort.
    Requires at least 2 values."""
    n = values.shape[0]
    ordered = np.sort(values)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(values, kind="stable")] = np.arange(n)
    # Without the element of rank r, position k of the others' sorted order holds ordered[k] below r, else
    # ordered[k + 1]; their median is the mean of positions (n - 2) // 2 and (n - 1) // 2.
    low, high = (n - 2) // 2, (n - 1) // 2
    at_low = np.where(low < rank, ordered[low], ordered[low + 1])
    at_high = np.where(high < rank, ordered[high], ordered[high + 1])
    return np.asarray((at_low + at_high) / 2.0)


def _take(matrix: npt.NDArray[np.generic], rows: list[int]) -> npt.NDArray[np.generic]:
    """matrix[rows] without a copy when the rows are all of them in order (the usual round: no one excluded)."""
    if len(rows) == matrix.shape[0] and rows == list(range(len(rows))):
        return matrix
    return matrix[rows]


def _cosines_with(
    safe: npt.NDArray[np.float32], norms: npt.NDArray[np.float64], rows: list[int], reference: FloatVector
) -> npt.NDArray[np.float64]:
    """Cosine of each listed update with `reference` (0 for a zero row or reference), one matrix-vector product."""
    size = float(np.linalg.norm(np.asarray(reference, dtype=np.float64)))
    dots = _row_dots(_take(safe, rows), reference)
    scale = norms[rows] * size
    return np.where(scale > 0.0, dots / np.where(scale > 0.0, scale, 1.0), 0.0)


@dataclass
class _Round:
    """The screens' working state for one round."""

    safe: npt.NDArray[np.float32]
    norms: npt.NDArray[np.float64]
    flags: dict[int, list[ScreenFlag]]
    clipped: dict[int, float] = field(default_factory=dict)
    combined: dict[int, float] = field(default_factory=dict)
    evidenced: set[int] = field(default_factory=set)

    def flag(self, member: int, reason: ScreenReason, measured: float) -> None:
        self.flags[member].append(ScreenFlag(reason, measured))

    def unflagged(self, members: Sequence[int]) -> list[int]:
        return [i for i in members if not any(f.excludes for f in self.flags[i])]


def _own_screens(
    state: _Round,
    candidates: list[int],
    settings: ScreenSettings,
    global_params: FloatVector | None,
    previous_global_delta: FloatVector | None,
    explained: npt.NDArray[np.float64],
) -> list[int]:
    """Step 1 after zero updates: each update judged against the global models alone."""
    if global_params is not None and float(np.linalg.norm(global_params)) > 0.0 and candidates:
        # cos(θ + δ, θ) from θ·θ, θ·δ and δ·δ: one matrix-vector product for every update.
        theta = np.asarray(global_params, dtype=np.float64)
        theta_sq = float(theta @ theta)
        along = _row_dots(_take(state.safe, candidates), theta)
        returned_sq = np.maximum(theta_sq + 2.0 * along + state.norms[candidates] ** 2, 0.0)
        scale = np.sqrt(theta_sq * returned_sq)
        cosines = np.where(scale > 0.0, (theta_sq + along) / np.where(scale > 0.0, scale, 1.0), 0.0)
        # Early steps from a small initial model can turn it further than half-way: an unrelated model is one far
        # below the typical update's cosine, not just below the bound.
        bound = settings.min_global_cosine * min(1.0, float(np.median(cosines)))
        for i, cosine in zip(candidates, cosines, strict=True):
            if cosine < bound:
                state.flag(i, ScreenReason.RANDOM_WEIGHTS, float(cosine))
        candidates = state.unflagged(candidates)
    if previous_global_delta is not None and float(np.linalg.norm(previous_global_delta)) > 0.0 and candidates:
        stale = _cosines_with(state.safe, state.norms, candidates, previous_global_delta)
        for i, cosine in zip(candidates, stale, strict=True):
            if cosine >= settings.stale_cosine:
                state.flag(i, ScreenReason.STALE_UPDATE, float(cosine))
        candidates = state.unflagged(candidates)
    for i in candidates:
        if explained[i] >= settings.data_free_explained:
            state.flag(i, ScreenReason.DATA_FREE, float(explained[i]))
    return state.unflagged(candidates)


def _groups(
    state: _Round,
    candidates: list[int],
    unit_residuals: npt.NDArray[np.float64],
    settings: ScreenSettings,
    grouped_before: Sequence[tuple[int, int]] = (),
) -> tuple[list[tuple[int, ...]], dict[int, float], dict[tuple[int, int], float]]:
    """Step 2: near-duplicates and same-data pairs joined into players; each member's share of its player; the
    similarity of every pair reported as the job's evidence (member indices, a < b).
    `unit_residuals` has one row per candidate, in the order of `candidates`; `grouped_before` are pairs of member
    indices that were one player in the previous round (they stay one at `same_data_persisting`)."""
    unit = _take(state.safe, candidates) / state.norms[candidates, None].astype(np.float32)
    duplicates = [(candidates[a], candidates[b]) for a, b in near_duplicate_pairs(unit, settings.duplicate_cosine)]
    same: list[tuple[int, int, float]] = []
    evidence: dict[tuple[int, int], float] = {}
    if settings.same_data_similarity < 1.0:
        # One pair search at the lowest threshold gives both the groups and the job's evidence.
        reported = min(settings.same_data_reference, settings.same_data_persisting)
        floor = min(settings.same_data_similarity, reported, settings.same_data_linked)
        similar = [(candidates[a], candidates[b], v) for a, b, v in same_data_pairs(unit_residuals, floor)]
        evidence = {(a, b): v for a, b, v in similar if v >= reported}
        evidence.update((pair, v) for pair, v in _mutual_best(similar).items() if v >= settings.same_data_linked)
        same = [(a, b, v) for a, b, v in similar if v >= settings.same_data_similarity]
        position = {c: k for k, c in enumerate(candidates)}
        linked = {(a, b) for a, b, _ in same} | set(duplicates)
        recheck = [
            (position[a], position[b])
            for a, b in sorted({(min(p), max(p)) for p in grouped_before})
            if a in position and b in position and (a, b) not in linked
        ]
        for (a, b), value in zip(recheck, pair_similarities(unit_residuals, recheck), strict=True):
            if value >= settings.same_data_persisting:
                same.append((candidates[a], candidates[b], float(value)))
    players = union_groups(candidates, duplicates + [(a, b) for a, b, _ in same])
    shares = {i: 1.0 for i in candidates}
    copied = {i for pair in duplicates for i in pair}
    strongest: dict[int, float] = {}
    for a, b, similarity in same:
        strongest[a] = max(strongest.get(a, 0.0), similarity)
        strongest[b] = max(strongest.get(b, 0.0), similarity)
    for group in players:
        if len(group) == 1:
            continue
        for i, share in zip(
            group,
            group_shares(state.safe, group, _typical(state, candidates, group), settings.copy_falloff),
            strict=True,
        ):
            shares[i] = share
            if i in copied:
                state.flag(i, ScreenReason.NEAR_DUPLICATE, float(len(group)))
            else:
                state.flag(i, ScreenReason.SAME_DATA, strongest.get(i, 0.0))
    return players, shares, evidence


def _typical(state: _Round, candidates: Sequence[int], group: Sequence[int]) -> float:
    """The median norm of the candidates outside `group` (0 when there are none)."""
    inside = set(group)
    outside = state.norms[[i for i in candidates if i not in inside]]
    return float(np.median(outside)) if outside.size else 0.0


def _members(
    state: _Round,
    players: list[tuple[int, ...]],
    shares: dict[int, float],
    owners: Sequence[str] | None,
    similarities: dict[tuple[int, int], float],
    settings: ScreenSettings,
) -> list[tuple[int, ...]]:
    """Step 4: the players holding devices of one member only joined into one (`owners`). After the random-direction
    screen, so that a device sending noise is judged on its own and not hidden in its member's data. A player that
    the data links made of several members' devices stays as it is: a device sending another member's update is
    that member's copy (groups.py shares it by size), not its own member's data. Within one member, players whose
    devices the round measured alike (`similarities`) at `same_data_linked` or more are one part, combined by their
    shares (groups.py): one round's similarity of a device holding part of its member's data dips below
    `same_data_similarity`, and a member's own devices need no job-long evidence to be suspected of the same data."""
    if owners is None:
        return players
    parts: dict[str, list[tuple[int, ...]]] = {}
    kept: list[tuple[int, ...]] = []
    for group in players:
        members = {owners[i] for i in group}
        if len(members) == 1:
            parts.setdefault(members.pop(), []).append(group)
        else:
            kept.append(group)
    admitted = [i for group in players for i in group]
    for member_parts in parts.values():
        if len(member_parts) > 1:
            member_parts = _alike_parts(state, member_parts, shares, similarities, settings, admitted)
        group = tuple(sorted(i for part in member_parts for i in part))
        kept.append(group)
        if len(group) > 1:
            _member_player(state, member_parts, shares, _typical(state, admitted, group))
            for i in group:
                state.flag(i, ScreenReason.SAME_MEMBER, float(len(group)))
    return sorted(kept, key=lambda group: group[0])


def _alike_parts(
    state: _Round,
    parts: list[tuple[int, ...]],
    shares: dict[int, float],
    similarities: dict[tuple[int, int], float],
    settings: ScreenSettings,
    admitted: list[int],
) -> list[tuple[int, ...]]:
    """One member's parts, those whose devices are alike at `same_data_linked` or more joined into one part with
    shares by size (groups.group_shares)."""
    part_of = {i: k for k, part in enumerate(parts) for i in part}
    links = [
        (part_of[a], part_of[b])
        for (a, b), similarity in similarities.items()
        if a in part_of and b in part_of and part_of[a] != part_of[b] and similarity >= settings.same_data_linked
    ]
    if not links:
        return parts
    joined = []
    for component in union_groups(list(range(len(parts))), links):
        devices = tuple(sorted(i for k in component for i in parts[k]))
        if len(component) > 1:
            typical = _typical(state, admitted, devices)
            sized = group_shares(state.safe, devices, typical, settings.copy_falloff)
            shares.update(zip(devices, sized, strict=True))
        joined.append(devices)
    return joined


def _member_player(state: _Round, parts: list[tuple[int, ...]], shares: dict[int, float], typical: float) -> None:
    """One member's devices as one player. Its `parts` are the players the screens left (a part of several devices
    is the same data, combined by its shares as groups.py says); the parts' updates add up, as one device training
    all of the member's data would send, but the sum is no longer than the longest part or the round's `typical`
    update, whichever is longer: a member whose data is spread over devices keeps the step of all of it, and a
    second device training the member's data again adds no more than one device could send alone (however much
    noise hides the data). Each part's share of the player is 1 / parts, split by its own shares; `state.combined`
    holds the factor each device's update is scaled by so that the shares give the sum."""
    combined = [
        np.asarray([shares[i] for i in part]) @ np.asarray(state.safe[list(part)], dtype=np.float64) for part in parts
    ]
    length = float(np.linalg.norm(np.sum(combined, axis=0)))
    cap = max(typical, max(float(np.linalg.norm(c)) for c in combined))
    scale = min(1.0, cap / length) if length > 0.0 else 1.0
    for part in parts:
        for i in part:
            shares[i] /= len(parts)
            state.combined[i] = scale * len(parts)


def _mutual_best(pairs: Sequence[tuple[int, int, float]]) -> dict[tuple[int, int], float]:
    """The pairs whose members are each other's most similar partner among `pairs` (a < b): at most one per member,
    so a round over n members reports at most n / 2 of them whatever the threshold."""
    best: dict[int, tuple[float, int]] = {}
    for a, b, value in pairs:
        for member, partner in ((a, b), (b, a)):
            if value > best.get(member, (-2.0, -1))[0]:
                best[member] = (value, partner)
    return {(a, b): v for a, b, v in pairs if best[a][1] == b and best[b][1] == a}


def _norm_outliers(
    state: _Round, candidates: list[int], settings: ScreenSettings, verified_examples: Sequence[int | None] | None
) -> None:
    """Updates far longer than the others', flagged and clipped to the limit (`state.clipped`; the caller scales its
    rows). It runs before grouping: a median is not moved by a few copies."""
    if len(candidates) < 3:
        return
    counts = None
    if verified_examples is not None and all(verified_examples[i] is not None for i in candidates):
        counts = {i: float(verified_examples[i] or 0) for i in candidates}
    median_count = float(np.median(list(counts.values()))) if counts else 0.0
    peer_medians = leave_one_out_medians(state.norms[candidates])
    for i, peer_median in zip(candidates, peer_medians, strict=True):
        limit = settings.norm_ratio_limit
        if counts is not None and median_count > 0.0:
            # More verified data means more local steps: a longer honest update, not an outlier.
            limit *= max(1.0, counts[i] / median_count)
        ratio = float(state.norms[i]) / peer_median if peer_median > 0.0 else 0.0
        if ratio > limit:
            state.flag(i, ScreenReason.NORM_OUTLIER, ratio)
            state.clipped[i] = limit / ratio


def _random_directions(
    state: _Round,
    players: list[tuple[int, ...]],
    shares: dict[int, float],
    remaining: npt.NDArray[np.float64],
    settings: ScreenSettings,
    validation_gradient: FloatVector | None,
    basis: npt.NDArray[np.float64],
    previous_updates: Sequence[FloatVector | None] | None,
    evidenced: Sequence[bool] | None = None,
) -> list[tuple[int, ...]]:
    """Step 3: a player (its members' share-weighted residual) that is noise against the other players' consensus
    and against the validation gradient, in a round where the other players agree with one another, unless one of
    its members' residual persists from its own update of the previous round (`previous_updates`, projected out of
    this round's data-free `basis`)."""
    if len(players) < 3 or settings.noise_z <= 0.0:
        return players
    rows = remaining[[g[0] for g in players]] * np.array([shares[g[0]] for g in players])[:, None]
    for p, group in enumerate(players):
        for i in group[1:]:
            rows[p] += shares[i] * remaining[i]
    sizes = _row_norms(rows)
    unit = rows / np.maximum(sizes, 1e-30)[:, None]
    total = unit.sum(axis=0)
    gradient = None if validation_gradient is None else np.asarray(validation_gradient, dtype=np.float64)
    evidence = np.empty(len(players))
    for start in range(0, len(players), _ROW_CHUNK):
        block = slice(start, start + _ROW_CHUNK)
        # data_free.noise_z of each player's residual against the sum of the other players' unit residuals...
        evidence[block] = np.abs(noise_z_rows(rows[block], total[None, :] - unit[block]))
        if gradient is not None:
            # ... and against the validation gradient: the larger of the two is the evidence of data.
            evidence[block] = np.maximum(evidence[block], np.abs(noise_z_rows(rows[block], gradient[None, :])))
    # Armed only where the other players carry evidence of data themselves: where they are noise-like too, being
    # noise-like proves nothing about this one.
    others = leave_one_out_medians(evidence)
    suspects = [p for p in range(len(players)) if others[p] >= settings.consensus_z and evidence[p] < settings.noise_z]
    # A member that keeps learning what it learnt last round has data, however different from the others' it is:
    # fresh noise does not persist (an honest PLAID member whose residual is noise-like against the others and the
    # gradient persisted at noise_z >= 23). Measured for the suspects only: one more residual per suspect member.
    persistence = np.zeros(remaining.shape[0])
    if settings.persistence_z > 0.0:
        persistence = _persistence(basis, remaining, previous_updates, [i for p in suspects for i in players[p]])
    # Only data persists by itself, but one noise direction sent every round persists too: the rescue needs a
    # member that showed evidence of data in an earlier round (`evidenced`).
    for p in range(len(players)):
        if evidence[p] >= settings.noise_z:
            state.evidenced.update(players[p])
    for p in suspects:
        group = players[p]
        rescued = [i for i in group if persistence[i] >= settings.persistence_z and (evidenced is None or evidenced[i])]
        if not rescued or settings.persistence_z <= 0.0:
            for i in group:
                state.flag(i, ScreenReason.RANDOM_DIRECTION, float(evidence[p]))
    return [g for g in players if not any(f.excludes for i in g for f in state.flags[i])]


def _persistence(
    basis: npt.NDArray[np.float64],
    remaining: npt.NDArray[np.float64],
    previous_updates: Sequence[FloatVector | None] | None,
    members: list[int],
) -> npt.NDArray[np.float64]:
    """For the listed members, noise_z of the residual against the residual (outside this round's data-free span) of
    the member's own update of the previous round; 0 for everyone else and where there is none."""
    persistence = np.zeros(remaining.shape[0])
    if previous_updates is None:
        return persistence
    known = [i for i in members if previous_updates[i] is not None]
    if not known:
        return persistence
    earlier = residuals(basis, np.stack([np.asarray(previous_updates[i], dtype=np.float32) for i in known]))
    persistence[known] = noise_z_rows(remaining[known], earlier)
    return persistence


def _self_reports(
    state: _Round,
    settings: ScreenSettings,
    reported_examples: Sequence[int | None] | None,
    verified_examples: Sequence[int | None] | None,
    reported_losses: Sequence[tuple[float, float] | None] | None,
) -> None:
    if reported_examples is not None and verified_examples is not None:
        for i, (reported, verified) in enumerate(zip(reported_examples, verified_examples, strict=True)):
            if reported is None or verified is None:
                continue
            gap = abs(reported - verified) / max(verified, 1)
            if gap > settings.self_report_tolerance:
                state.flag(i, ScreenReason.SELF_REPORT_MISMATCH, float(reported / max(verified, 1)))
    if reported_losses is not None:
        for i, losses in enumerate(reported_losses):
            # A claimed training loss drop means nothing by itself (a member can write any number), but claiming one
            # for an update that provably was not trained is a lie on the record.
            if losses is None or not any(f.proves_data_free for f in state.flags[i]):
                continue
            before, after = losses
            if np.isfinite(before) and np.isfinite(after) and after < before:
                state.flag(i, ScreenReason.LOSS_CLAIM_UNSUPPORTED, float(before - after))


def screen_updates(
    deltas: FloatVector,
    *,
    settings: ScreenSettings,
    global_params: FloatVector | None = None,
    previous_global_delta: FloatVector | None = None,
    earlier_globals: Sequence[FloatVector] = (),
    validation_gradient: FloatVector | None = None,
    reported_examples: Sequence[int | None] | None = None,
    verified_examples: Sequence[int | None] | None = None,
    reported_losses: Sequence[tuple[float, float] | None] | None = None,
    previous_updates: Sequence[FloatVector | None] | None = None,
    grouped_before: Sequence[tuple[int, int]] = (),
    owners: Sequence[str] | None = None,
    evidenced: Sequence[bool] | None = None,
) -> ScreenReport:
    """Screen the (m, d) matrix of observed updates (each member's parameters minus the global model).

    `earlier_globals` are the global models of earlier rounds, most recent first (at most `history_rounds` are
    used); `validation_gradient` is the validation loss gradient at the global model; `reported_losses` are the
    members' own (loss before, loss after) training claims; `previous_updates` each member's own update of the
    previous round (None for a member that sent none); `grouped_before` pairs of members that were one player in
    the previous round; `owners` the member each update's device belongs to (None: every update its own member):
    a member's devices that pass the own screens are one player; `evidenced` whether each member showed evidence of
    data in an earlier round (`ScreenReport.evidenced`; None: every member counts as having shown it), which the
    random-direction screen's persistence rescue requires.
    """
    m = deltas.shape[0]
    finite: npt.NDArray[np.bool_] = np.asarray(np.isfinite(deltas).all(axis=1))
    safe = np.asarray(deltas, dtype=np.float32)
    if not finite.all():
        safe = np.where(finite[:, None], safe, np.float32(0.0))
    state = _Round(safe, _row_norms(safe), {i: [] for i in range(m)})
    alive = [i for i in range(m) if bool(finite[i])]
    for i in range(m):
        if not finite[i]:
            state.flag(i, ScreenReason.NON_FINITE, 0.0)

    positive = [state.norms[i] for i in alive if state.norms[i] > 0.0]
    median_norm = float(np.median(positive)) if positive else 0.0
    for i in alive:
        if state.norms[i] == 0.0 or state.norms[i] <= settings.zero_tolerance * median_norm:
            state.flag(i, ScreenReason.ZERO_UPDATE, float(state.norms[i]))
    candidates = state.unflagged(alive)

    earlier = list(earlier_globals)[: settings.history_rounds]
    basis = data_free_basis(global_params, previous_global_delta, earlier)
    remaining = residuals(basis, safe)
    explained = explained_fraction(safe, remaining)
    candidates = _own_screens(state, candidates, settings, global_params, previous_global_delta, explained)
    _norm_outliers(state, candidates, settings, verified_examples)
    if state.clipped:
        state.safe = state.safe.copy()  # `safe` may be the caller's own array
    for i, factor in state.clipped.items():
        # What every later screen, the game and the aggregation see: the update at the limit's length.
        state.safe[i] *= np.float32(factor)
        state.norms[i] *= factor
        remaining[i] *= factor

    kept = _take(remaining, candidates)
    unit_residuals = kept / np.maximum(_row_norms(kept), 1e-30)[:, None]
    players, shares, similarities = _groups(state, candidates, unit_residuals, settings, grouped_before)
    players = _random_directions(
        state, players, shares, remaining, settings, validation_gradient, basis, previous_updates, evidenced
    )
    players = _members(state, players, shares, owners, similarities, settings)
    _self_reports(state, settings, reported_examples, verified_examples, reported_losses)
    admitted = {i for g in players for i in g}
    return ScreenReport(
        flags={i: f for i, f in state.flags.items() if f},
        players=players,
        shares={i: s for i, s in shares.items() if i in admitted},
        similarities=similarities,
        clipped={i: f for i, f in state.clipped.items() if i in admitted},
        combined={i: f for i, f in state.combined.items() if i in admitted},
        evidenced=frozenset(state.evidenced),
    )
