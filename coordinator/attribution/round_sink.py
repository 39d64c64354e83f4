"""The attribution hook of the job strategy: values every captured round on the buyer's validation set.

The strategy's `UpdateCapture` (coordinator.federation.strategy.update_capture) hands each round's captured per-node
parameters to an UpdateSink before aggregating. The capture names the global model only by its SHA-256, so the
ServerApp also shows this sink each global model it evaluates (`observe_global`, called from its evaluate_fn: round 0
is the initial model, round r the model that round r + 1 trains from). A round whose global model the sink has not
seen is recorded as skipped, never raised: a valuation problem must not fail the buyer's job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from coordinator.attribution.history import AttributionAccount
from coordinator.attribution.reputation import ReputationBook
from coordinator.attribution.task_loss import TaskValidationLoss
from coordinator.attribution.valuation import RoundUpdates, RoundValuation, ValuationSettings, value_round
from coordinator.capture.round import RoundCapture, UpdateSink
from protocol.errors import ProtocolError
from protocol.tasks.arrays import arrays_sha256


@dataclass(frozen=True)
class SkippedRound:
    round: int
    reason: str


class AttributionSink:
    """An UpdateSink that values rounds, accumulates a job's attribution and feeds the reputation book.

    Parameters
    ----------
    loss:
        Validation loss (and gradient) of the job's task model on the buyer's validation windows.
    settings:
        Valuation settings (method thresholds, screens, seed).
    member_of:
        Maps a SuperLink node id to the member id that attribution and pay are recorded under (default: str).
    owner_of:
        Maps a node id to the member its device belongs to, when the job knows it: one member's devices are one
        player (screens: `owners`). Default None: every node is its own member's.
    verified_examples:
        (round, node id) -> the example count the coordinator verified itself, or None; never the node's claim.
    decay:
        lambda-MR round decay of the job's account (default 1.0, the plain sum).
    reputation:
        The MID's reputation book to record rounds into (default: a fresh one).
    then:
        Another sink to pass each capture on to afterwards (e.g. CaptureDirectory).
    """

    def __init__(
        self,
        loss: TaskValidationLoss,
        settings: ValuationSettings,
        *,
        member_of: Callable[[int], str] = str,
        owner_of: Callable[[int], str] | None = None,
        verified_examples: Callable[[int, int], int | None] | None = None,
        decay: float = 1.0,
        reputation: ReputationBook | None = None,
        then: UpdateSink | None = None,
    ) -> None:
        self.loss = loss
        self.settings = settings
        self.member_of = member_of
        self.owner_of = owner_of
        self.verified_examples = verified_examples
        self.account = AttributionAccount(decay=decay, screen_settings=settings.screens)
        self.reputation = reputation if reputation is not None else ReputationBook()
        self.valuations: list[RoundValuation] = []
        self.skipped: list[SkippedRound] = []
        self._then = then
        # The global models seen, oldest first: the last one is what the next round trains from, the ones before it
        # are what a member without data could replay or mix (screens: data_free).
        self._globals: dict[str, npt.NDArray[np.float32]] = {}
        self._excluded: dict[int, frozenset[int]] = {}
        self._weights: dict[int, dict[int, float]] = {}
        self._clipped: dict[int, dict[int, float]] = {}
        self._combined: dict[int, dict[int, float]] = {}
        # Each member's update of the last valued round: an update that keeps learning the same data is not noise
        # (screens: random direction). One (d,) float32 row per member of that round.
        self._previous: dict[str, npt.NDArray[np.float32]] = {}
        # The last valued round's players of more than one member: same data stays one player (screens: same data).
        self._previous_groups: list[tuple[str, ...]] = []
        # Members that showed evidence of data in a valued round: only they are rescued for persisting (screens:
        # random direction).
        self._evidenced: set[str] = set()

    def observe_global(self, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
        """Remember a global model the strategy may send out (keeps the last `history_rounds` + 1)."""
        flat = self.loss.flatten(arrays)
        digest = arrays_sha256(dict(arrays))
        if digest in self._globals:
            return
        self._globals[digest] = flat
        keep = self.settings.screens.history_rounds + 1
        self._globals = dict(list(self._globals.items())[-keep:])

    def excluded_nodes(self, server_round: int) -> frozenset[int]:
        """Node ids a screen excluded in `server_round` (empty for a round not valued): the strategy aggregates
        without them (coordinator.federation.strategy.valued_aggregation)."""
        return self._excluded.get(server_round, frozenset())

    def member_weights(self, server_round: int) -> dict[int, float]:
        """Node id -> the weight the round's valuation gave its update (0 when excluded); empty for a round not
        valued."""
        return dict(self._weights.get(server_round, {}))

    def clip_factors(self, server_round: int) -> dict[int, float]:
        """Node id -> the factor (< 1) its update was valued at, being longer than the norm limit (screens: norm
        outlier): the strategy aggregates it so scaled. Empty when none was, or the round was not valued."""
        return dict(self._clipped.get(server_round, {}))

    def combine_factors(self, server_round: int) -> dict[int, float]:
        """Node id -> the factor, on top of its clip, its update is aggregated at so that one member's devices add up
        as they were valued (screens: `owners`); empty when no member sent more than one admitted update."""
        return dict(self._combined.get(server_round, {}))

    def on_round(self, capture: RoundCapture) -> None:
        try:
            self._value(capture)
        except ProtocolError as error:
            self.skipped.append(SkippedRound(capture.round, str(error)))
        finally:
            if self._then is not None:
                self._then.on_round(capture)

    def _value(self, capture: RoundCapture) -> None:
        if not capture.updates:
            self.skipped.append(SkippedRound(capture.round, "no updates"))
            return
        global_flat = self._globals.get(capture.global_sha256)
        if global_flat is None:
            self.skipped.append(SkippedRound(capture.round, f"global model {capture.global_sha256[:16]} not observed"))
            return
        updates = np.stack([self.loss.flatten(u.arrays) - global_flat for u in capture.updates])
        seen = list(self._globals)
        earlier = [self._globals[d] for d in reversed(seen[: seen.index(capture.global_sha256)])]
        verified = None
        if self.verified_examples is not None:
            verified = [self.verified_examples(capture.round, u.node_id) for u in capture.updates]
        members = [self.member_of(u.node_id) for u in capture.updates]
        valuation = value_round(
            RoundUpdates(
                round_index=capture.round,
                members=members,
                global_params=global_flat,
                updates=updates,
                reported_examples=[u.examples_reported for u in capture.updates],
                verified_examples=verified,
                previous_global_delta=global_flat - earlier[0] if earlier else None,
                earlier_globals=earlier,
                reported_losses=[_reported_losses(u.metrics) for u in capture.updates],
                previous_updates=[self._previous.get(member) for member in members],
                previous_groups=self._previous_groups,
                owners=None if self.owner_of is None else [self.owner_of(u.node_id) for u in capture.updates],
                evidenced=[member in self._evidenced for member in members],
            ),
            self.loss,
            self.settings,
            gradient=self.loss.gradient,
        )
        self.account.add(valuation)
        self.reputation.record(valuation)
        self.valuations.append(valuation)
        self._previous = {member: updates[i] for i, member in enumerate(members)}
        self._previous_groups = [group for group in valuation.players if len(group) > 1]
        self._evidenced |= valuation.evidenced
        nodes = {member: u.node_id for member, u in zip(members, capture.updates, strict=True)}
        self._excluded[capture.round] = frozenset(
            nodes[member] for member, flags in valuation.flags.items() if any(f.excludes for f in flags)
        )
        self._weights[capture.round] = {nodes[member]: w for member, w in valuation.weights.items()}
        self._clipped[capture.round] = {nodes[member]: f for member, f in valuation.clipped.items()}
        self._combined[capture.round] = {nodes[member]: f for member, f in valuation.combined.items()}


def _reported_losses(metrics: Mapping[str, float]) -> tuple[float, float] | None:
    """The (loss before, loss after) training a device reported (edge.federated.client_app), if it did."""
    before, after = metrics.get("loss-before"), metrics.get("loss-after")
    if before is None or after is None:
        return None
    return float(before), float(after)
