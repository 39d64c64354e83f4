"""One round of local training for a task, independent of Flower (the ClientApp and benchmarks call it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.tasks.models import build_model, evaluate, full_gradient, load_arrays, model_arrays, train_epochs
from protocol.tasks.schedule import LrSchedule, scheduled_lr
from protocol.tasks.spec import TaskSpec
from protocol.tasks.windows import WindowSet


class LocalTrainingConfig(BaseModel):
    """The run-config keys a ClientApp reads (names as in the Flower app's [tool.flwr.app.config]).

    Parameters
    ----------
    task_id, task_version: the task the job trains.
    local_epochs: passes over the local windows per round (default 1).
    batch_size: minibatch size (default 32).
    lr: Adam learning rate (default 0.003); with a schedule, the first round's.
    lr_schedule: how the lr moves over the rounds (protocol.tasks.schedule; default constant).
    num_rounds: the job's rounds (default None: unknown, allowed only with the constant schedule); a train message
        for a round outside 1..num_rounds is refused.
    max_examples: at most this many windows per round, sampled per round from the seed (default 100000).
    seed: base seed; the round number is added so every round shuffles differently but reproducibly.
    torch_threads: intra-op threads for local training (default 1: the models are tiny, and more threads only
        contend with each other and with Flower's processes on a small device; measured in bench/fl_bench.py).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    task_id: str = Field(alias="task-id")
    task_version: int = Field(alias="task-version", ge=1)
    local_epochs: int = Field(alias="local-epochs", default=1, ge=1, le=1000)
    batch_size: int = Field(alias="batch-size", default=32, ge=1, le=65536)
    lr: float = Field(default=0.003, gt=0, le=10)
    lr_schedule: LrSchedule = Field(alias="lr-schedule", default=LrSchedule.CONSTANT)
    num_rounds: int | None = Field(alias="num-rounds", default=None, ge=1, le=10_000)
    max_examples: int = Field(alias="max-examples", default=100_000, ge=1)
    seed: int = Field(default=0, ge=0)
    torch_threads: int = Field(alias="torch-threads", default=1, ge=1, le=256)

    @model_validator(mode="after")
    def _schedule_knows_its_length(self) -> LocalTrainingConfig:
        if self.lr_schedule is not LrSchedule.CONSTANT and self.num_rounds is None:
            raise ValueError(f"lr-schedule {self.lr_schedule} needs num-rounds")
        return self

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> LocalTrainingConfig:
        return cls.model_validate(dict(run_config))

    def round_lr(self, server_round: int) -> float:
        """The lr of `server_round`. The round number comes from the server's message: one outside
        1..num_rounds (or below 1 when num_rounds is unknown) is a MalformedError, never a silent extrapolation."""
        rounds = self.num_rounds if self.num_rounds is not None else max(server_round, 1)
        return scheduled_lr(self.lr_schedule, self.lr, server_round, rounds)


@dataclass(frozen=True)
class RoundResult:
    arrays: dict[str, npt.NDArray[np.generic]]
    examples: int
    loss_before: float
    loss_after: float


def round_sample(
    windows: WindowSet, settings: LocalTrainingConfig, server_round: int
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic] | None]:
    """The windows a round uses: all of them, or `max_examples` drawn from the round's seed (the same draw for the
    round's gradient query and its training, so a drift offset is computed on the data it corrects)."""
    x, y = windows.x, windows.y
    if len(x) > settings.max_examples:
        pick = np.random.default_rng(settings.seed + server_round).choice(len(x), settings.max_examples, replace=False)
        x, y = x[pick], None if y is None else y[pick]
    return x, y


@dataclass(frozen=True)
class RoundGradient:
    arrays: dict[str, npt.NDArray[np.generic]]
    examples: int
    loss: float


def round_gradient(
    spec: TaskSpec,
    global_arrays: Mapping[str, npt.NDArray[np.generic]],
    windows: WindowSet,
    settings: LocalTrainingConfig,
    server_round: int,
) -> RoundGradient:
    """The full-batch gradient of the loss on the round's windows at the global model (drift-correction query)."""
    torch.set_num_threads(settings.torch_threads)
    x, y = round_sample(windows, settings, server_round)
    model = build_model(spec)
    load_arrays(model, global_arrays)
    loss = evaluate(spec, model, x, y)["loss"]
    return RoundGradient(arrays=full_gradient(spec, model, x, y), examples=len(x), loss=loss)


def train_round(
    spec: TaskSpec,
    global_arrays: Mapping[str, npt.NDArray[np.generic]],
    windows: WindowSet,
    settings: LocalTrainingConfig,
    server_round: int,
    gradient_offset: Mapping[str, npt.NDArray[np.generic]] | None = None,
) -> RoundResult:
    """Train the global model on (a round-seeded sample of) the windows; losses are measured on the same sample.

    `gradient_offset`: the drift offset the coordinator sent for this round (protocol.tasks.drift), added to every
    minibatch gradient; None trains plain. The lr is the round's under the job's schedule (a round outside the job's
    is refused before any work).
    """
    lr = settings.round_lr(server_round)
    torch.set_num_threads(settings.torch_threads)
    x, y = round_sample(windows, settings, server_round)
    model = build_model(spec)
    load_arrays(model, global_arrays)
    before = evaluate(spec, model, x, y)["loss"]
    train_epochs(
        spec,
        model,
        x,
        y,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=lr,
        seed=settings.seed + server_round,
        gradient_offset=gradient_offset,
    )
    after = evaluate(spec, model, x, y)["loss"]
    return RoundResult(arrays=model_arrays(model), examples=len(x), loss_before=before, loss_after=after)
