"""Versioned training task specs: what a window is, what it is labelled with, and which model learns it.

A job names a task by (id, version); device and coordinator must build exactly the same model from it, so a spec
never changes once published: a change is a new version. This module is torch-free so that `import protocol` stays
light; the models live in `protocol.tasks.models`, imported only by code that trains or evaluates.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.errors import MalformedError
from protocol.tasks.schedule import LrSchedule

TaskId = Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")]

WindowMode = Literal["sliding", "segment"]
"""How a device cuts a task's windows from its samples: "sliding" cuts runs of consecutive good samples every
`window_stride` samples; "segment" makes one window of each recorded segment (one recording), resampled to
`window_length`."""


class TaskKind(StrEnum):
    """What the model predicts, which fixes the loss and the metrics."""

    CLASSIFICATION = "classification"  # one label per window; cross-entropy; accuracy
    FORECAST = "forecast"  # the next sample of every feature; MSE; MAE
    AUTOENCODER = "autoencoder"  # the window itself; MSE; reconstruction error


class TrainingRecipe(BaseModel):
    """A task's default budget and recipe: what `midgate coordinator job start` runs for every setting the operator
    leaves out. Not part of the model's identity (device and coordinator build the model from the rest of the spec,
    and every value here travels in the job's run config), so a published spec may carry a better recipe later.

    Parameters
    ----------
    rounds: federated rounds (default 3).
    local_epochs: passes over a device's windows per round (default 1).
    batch_size, lr: the devices' minibatch size and base Adam learning rate (default 32, 0.003).
    lr_schedule: the lr over the rounds (protocol.tasks.schedule; default constant).
    server_momentum: FedAvgM's server momentum (default 0: plain FedAvg).
    drift_correction: strength in [0, 1] of the drift correction (default 0: off; `job start` turns it off for a DP
        job unless the operator asked for it, which is then refused).
    tail_average: the final model is the mean of the last K rounds' global models (default 1; at most the rounds).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    rounds: int = Field(default=3, ge=1, le=10_000)
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    lr: float = Field(default=0.003, gt=0, le=10)
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    server_momentum: float = Field(default=0.0, ge=0, lt=1)
    drift_correction: float = Field(default=0.0, ge=0, le=1)
    tail_average: int = Field(default=1, ge=1, le=1000)


class TaskSpec(BaseModel):
    """One published version of a training task.

    Parameters
    ----------
    id, version:
        The job names these two; together they select exactly one model architecture and data layout.
    kind:
        Fixes the loss and metrics (see `TaskKind`).
    features:
        Channel names of a window, in array order (windows are float32 arrays shaped (channels, window_length)).
    window_length:
        Samples per window and channel.
    labels:
        Class names in label-index order for classification; empty otherwise. A device maps its own labels to
        these by name, never by index.
    window_mode:
        How a device cuts windows from its samples (`WindowMode`); default "sliding".
    window_stride:
        Sliding step in samples; default None: one window length (non-overlapping). Sliding mode only.
    hidden:
        Width of the model's hidden layers; part of the architecture, hence of the spec.
    recipe:
        The default budget and training recipe of a job on this task (`TrainingRecipe`).
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    id: TaskId
    version: int = Field(ge=1)
    kind: TaskKind
    features: tuple[str, ...] = Field(min_length=1, max_length=64)
    window_length: int = Field(ge=2, le=100_000)
    labels: tuple[str, ...] = Field(default=(), max_length=1000)
    window_mode: WindowMode = "sliding"
    window_stride: int | None = Field(default=None, ge=1, le=100_000)
    hidden: int = Field(ge=1, le=4096)
    description: str = ""
    recipe: TrainingRecipe = TrainingRecipe()

    @model_validator(mode="after")
    def _stride_only_when_sliding(self) -> Self:
        if self.window_mode == "segment" and self.window_stride is not None:
            raise ValueError("window_stride applies to sliding windows only")
        return self

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def channels(self) -> int:
        return len(self.features)


# PLAID (Plug-Load Appliance Identification Dataset, the UCR release sktime ships) has 11 appliance classes and
# one current channel per recording, 100..1344 samples long; a window is one whole recording resampled by linear
# interpolation to 128 points (edge.sensors.plaid), which keeps the start-up transient of every recording.
PLAID_APPLIANCE = TaskSpec(
    id="plaid-appliance",
    version=1,
    kind=TaskKind.CLASSIFICATION,
    features=("current",),
    window_length=128,
    labels=(
        "air_conditioner",
        "compact_fluorescent_lamp",
        "fan",
        "fridge",
        "hairdryer",
        "heater",
        "incandescent_light_bulb",
        "laptop",
        "microwave",
        "vacuum",
        "washing_machine",
    ),
    window_mode="segment",
    hidden=64,
    description="Appliance classification from one recording of current resampled to 128 points (PLAID, 11 classes).",
    # Measured in BENCHMARKS.md ("Accuracy, session 6"; docs/federated.md, "Accuracy"): on 5 label-skewed devices
    # this reached PLAID test accuracy 0.78-0.83, a mean 1.6 points below central training over 7 deployed runs.
    # Five rounds of the old defaults (constant lr 0.003, batch 32, plain FedAvg) reached 0.32.
    recipe=TrainingRecipe(
        rounds=60,
        local_epochs=1,
        batch_size=8,
        lr=0.006,
        lr_schedule=LrSchedule.LATE_COSINE,
        server_momentum=0.7,
        drift_correction=1.0,
        tail_average=10,
    ),
)

ENV_FORECAST = TaskSpec(
    id="env-forecast",
    version=1,
    kind=TaskKind.FORECAST,
    features=("temperature_c", "humidity_pct", "pressure_hpa"),
    window_length=32,
    hidden=32,
    description="Next-step forecast of temperature, humidity and pressure from the previous 32 samples.",
)

HOST_ANOMALY = TaskSpec(
    id="host-anomaly",
    version=1,
    kind=TaskKind.AUTOENCODER,
    features=("cpu_percent", "memory_percent", "load1", "cpu_temp_c"),
    window_length=16,
    hidden=16,
    description="Autoencoder over host-sensor windows; reconstruction error is the anomaly score.",
)

REGISTRY: dict[tuple[str, int], TaskSpec] = {
    (s.id, s.version): s for s in (PLAID_APPLIANCE, ENV_FORECAST, HOST_ANOMALY)
}


class UnknownTaskError(MalformedError):
    """A job names a task id or version that is not in the registry."""


def get_task(task_id: str, version: int) -> TaskSpec:
    """The published spec for (task_id, version); raises UnknownTaskError naming what is known."""
    spec = REGISTRY.get((task_id, version))
    if spec is None:
        raise UnknownTaskError(
            "unknown task", task_id=task_id, version=version, known=sorted(s.key for s in REGISTRY.values())
        )
    return spec
