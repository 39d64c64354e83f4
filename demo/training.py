"""In-process federated rounds of task plaid-appliance@1: the strategy's code path with the Flower engine taken out.

Each honest household trains the global model on its own windows with the same function its Flower ClientApp
calls (edge.federated.training.train_round); the free rider sends the global model back untouched while claiming
it trained. The coordinator side screens and values each round on the buyer's validation data
(coordinator.attribution.value_round), aggregates with the valuation's weights (so a screened update cannot move
the model), and accumulates the attribution that settlement pays by.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from coordinator.attribution import (
    AttributionAccount,
    ReputationBook,
    RoundUpdates,
    RoundValuation,
    ValuationSettings,
    value_round,
)
from coordinator.attribution.task_loss import TaskValidationLoss
from demo.households import Household
from edge.federated.training import LocalTrainingConfig, RoundResult, train_round
from edge.sensors.plaid import LabelledWindows
from protocol.tasks.models import build_model, evaluate, load_arrays, model_arrays
from protocol.tasks.spec import PLAID_APPLIANCE as TASK

Arrays = dict[str, npt.NDArray[np.generic]]
# Small enough for a one-minute demo on a loaded 2-core machine, large enough that every round helps.
LOCAL = LocalTrainingConfig.model_validate(
    {"task-id": TASK.id, "task-version": TASK.version, "local-epochs": 4, "batch-size": 16, "lr": 0.003, "seed": 7}
)


@dataclass(frozen=True)
class LocalUpdate:
    household: str
    received: Arrays
    returned: Arrays
    examples_claimed: int
    loss_before: float
    loss_after: float
    seconds: float


@dataclass
class FederatedJob:
    """The coordinator's state across rounds: global model, buyer validation loss, attribution account."""

    validation: LabelledWindows
    settings: ValuationSettings = field(default_factory=ValuationSettings)
    account: AttributionAccount = field(default_factory=AttributionAccount)
    reputation: ReputationBook = field(default_factory=ReputationBook)
    valuations: list[RoundValuation] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._x_val = self.validation.X[:, None, :]
        self.loss = TaskValidationLoss(TASK, build_model(TASK, 0), self._x_val, self.validation.y)
        self.global_arrays: Arrays = model_arrays(build_model(TASK, 0))
        self._previous_delta: npt.NDArray[np.float32] | None = None

    def buyer_metrics(self) -> dict[str, float]:
        """Loss and accuracy of the current global model on the buyer's held-out validation windows."""
        model = build_model(TASK, 0)
        load_arrays(model, self.global_arrays)
        return evaluate(TASK, model, self._x_val, self.validation.y)

    def value_and_aggregate(self, round_index: int, updates: list[LocalUpdate]) -> RoundValuation:
        """Screen, value (exact Shapley for this few players), aggregate with the valuation's weights."""
        global_flat = self.loss.flatten(self.global_arrays)
        deltas = np.stack([self.loss.flatten(u.returned) - global_flat for u in updates])
        names = [u.household for u in updates]
        valuation = value_round(
            RoundUpdates(
                round_index=round_index,
                members=names,
                global_params=global_flat,
                updates=deltas,
                reported_examples=[u.examples_claimed for u in updates],
                previous_global_delta=self._previous_delta,
            ),
            self.loss,
            self.settings,
        )
        self.account.add(valuation)
        self.reputation.record(valuation)
        self.valuations.append(valuation)
        weights = np.asarray([valuation.weights[n] for n in names], dtype=np.float32)
        aggregate = (weights[:, None] * deltas).sum(axis=0).astype(np.float32)
        self._previous_delta = aggregate
        self.global_arrays = dict(self.loss.unflatten(global_flat + aggregate))
        return valuation


def local_round(household: Household, global_arrays: Arrays, round_index: int) -> LocalUpdate:
    """What a household's device sends back for one round."""
    if household.free_rider:
        # Sends back what it received, claiming as many windows, losses and seconds as an honest household's.
        return LocalUpdate(household.name, global_arrays, dict(global_arrays), 150, 2.4, 1.9, 1.5)
    started = time.perf_counter()
    result: RoundResult = train_round(TASK, global_arrays, household.window_set, LOCAL, round_index)
    return LocalUpdate(
        household.name,
        global_arrays,
        result.arrays,
        result.examples,
        result.loss_before,
        result.loss_after,
        time.perf_counter() - started,
    )
