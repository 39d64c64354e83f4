"""Versioned training task specs: what a window is, where its data comes from, what it is labelled with, and which
model of the vetted families learns it.

A task is data, not code: a JSON document (`TaskSpec`) that the MID signs with its key (protocol.tasks.signed) and
devices accept only with that signature. Its model is one of a few vetted families (`ModelFamily`, built by
protocol.tasks.models) with its hyperparameters as data, so no buyer's code ever runs on a member's device. The three
built-in tasks ship as files in protocol/tasks/specs/ (`REGISTRY`).

A job names a task by (id, version); device and coordinator must build exactly the same model from it, so a spec
never changes once published: a change is a new version. This module is torch-free so that `import protocol` stays
light; the models live in `protocol.tasks.models`, imported only by code that trains or evaluates.
"""

from __future__ import annotations

import functools
from enum import StrEnum
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from protocol.errors import MalformedError, Reason, TooLargeError
from protocol.messages import WireMessage
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


class ModelFamily(StrEnum):
    """The vetted model families a spec may name (protocol.tasks.models builds each); each serves one `TaskKind`."""

    CONV1D_CLASSIFIER = "conv1d-classifier"  # two 1-D convolutions, a log-RMS level and a linear head
    MLP_CLASSIFIER = "mlp-classifier"  # a dense layer over the flattened window and a linear head
    GRU_FORECASTER = "gru-forecaster"  # a GRU over the window and a linear head for the next sample
    DENSE_AUTOENCODER = "dense-autoencoder"  # a dense bottleneck over the flattened window

    @property
    def kind(self) -> TaskKind:
        return _FAMILY_KIND[self]


_FAMILY_KIND = {
    ModelFamily.CONV1D_CLASSIFIER: TaskKind.CLASSIFICATION,
    ModelFamily.MLP_CLASSIFIER: TaskKind.CLASSIFICATION,
    ModelFamily.GRU_FORECASTER: TaskKind.FORECAST,
    ModelFamily.DENSE_AUTOENCODER: TaskKind.AUTOENCODER,
}

MAX_MODEL_PARAMETERS = 2_000_000
"""A spec whose model would hold more parameters is refused: a member's device trains it, often a Raspberry Pi."""
MAX_TASK_SPEC_BYTES = 16 * 1024
"""A spec document larger than this is refused before it is parsed."""

ChannelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")]
SourceName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.:-]{0,63}$")]
"""A sensor kind as the agent records it with its samples (edge.sensors.driver.Sensor.source): "simulated",
"linux", "bme280", "plaid" (the PLAID replay from the sktime wheel), or what a member declares for a replayed file."""


class TaskInput(BaseModel):
    """One input channel of a task: its name, its unit, and the sensor kinds it may come from.

    A device offers a sensor's data to a task only when the sensor has every input by name, with the same unit, and
    is of one of the input's sources; anything else is refused with the reason, never renamed or relabelled.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: ChannelName
    unit: Annotated[str, StringConstraints(max_length=16)]
    sources: tuple[SourceName, ...] = Field(min_length=1, max_length=16)


class ModelSpec(BaseModel):
    """The task's model: a vetted family and its hyperparameters (part of the architecture, hence of the spec)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    family: ModelFamily
    hidden: int = Field(ge=2, le=4096)
    """Width of the model's hidden layers (the autoencoder's bottleneck is a quarter of it, at least 2)."""


class TaskSpec(WireMessage):
    """One published version of a training task; the document the MID signs (PAYLOAD_TYPE).

    Parameters
    ----------
    id, version:
        The job names these two; together they select exactly one model architecture and data layout.
    kind:
        Fixes the loss and metrics (see `TaskKind`).
    inputs:
        The window's channels in array order (windows are float32 arrays shaped (channels, window_length)), each with
        its unit and the sensor kinds it may come from (`TaskInput`).
    window_length:
        Samples per window and channel.
    labels:
        Class names in label-index order for classification (at least two); empty otherwise. A device maps its own
        labels to these by name, never by index.
    window_mode:
        How a device cuts windows from its samples (`WindowMode`); default "sliding".
    window_stride:
        Sliding step in samples; default None: one window length (non-overlapping). Sliding mode only.
    model:
        The vetted model family and its hyperparameters (`ModelSpec`); the family must serve `kind`.
    recipe:
        The default budget and training recipe of a job on this task (`TrainingRecipe`).
    """

    PAYLOAD_TYPE: ClassVar[str] = "application/vnd.midgate.task-spec.v1+json"

    id: TaskId
    version: int = Field(ge=1, le=1_000_000)
    kind: TaskKind
    description: Annotated[str, StringConstraints(max_length=512)] = ""
    inputs: tuple[TaskInput, ...] = Field(min_length=1, max_length=64)
    window_length: int = Field(ge=2, le=100_000)
    window_mode: WindowMode = "sliding"
    window_stride: int | None = Field(default=None, ge=1, le=100_000)
    labels: tuple[Annotated[str, StringConstraints(min_length=1, max_length=64)], ...] = Field(
        default=(), max_length=1000
    )
    model: ModelSpec
    recipe: TrainingRecipe = TrainingRecipe()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.window_mode == "segment" and self.window_stride is not None:
            raise ValueError("window_stride applies to sliding windows only")
        if len({i.name for i in self.inputs}) != len(self.inputs):
            raise ValueError("an input channel is named twice")
        if self.model.family.kind is not self.kind:
            raise ValueError(f"model family {self.model.family} does not serve a {self.kind} task")
        if self.kind is TaskKind.CLASSIFICATION and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise ValueError("a classification task names at least two distinct labels")
        if self.kind is not TaskKind.CLASSIFICATION and self.labels:
            raise ValueError(f"a {self.kind} task has no labels")
        if self.parameter_count() > MAX_MODEL_PARAMETERS:
            raise ValueError(f"the model would hold {self.parameter_count()} parameters, above {MAX_MODEL_PARAMETERS}")
        return self

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def features(self) -> tuple[str, ...]:
        """The input channel names in array order."""
        return tuple(i.name for i in self.inputs)

    @property
    def channels(self) -> int:
        return len(self.inputs)

    @property
    def hidden(self) -> int:
        return self.model.hidden

    def parameter_count(self) -> int:
        """How many parameters the family's model holds for this spec (protocol.tasks.models builds exactly these)."""
        c, w, h, n = self.channels, self.window_length, self.model.hidden, len(self.labels)
        match self.model.family:
            case ModelFamily.CONV1D_CLASSIFIER:
                half = h // 2
                return c * half * 7 + half + half * h * 5 + h + (h * 4 + c) * n + n
            case ModelFamily.MLP_CLASSIFIER:
                return c * w * h + h + h * n + n
            case ModelFamily.GRU_FORECASTER:
                return 3 * (c * h + h * h + 2 * h) + h * c + c
            case ModelFamily.DENSE_AUTOENCODER:
                b = max(2, h // 4)
                return 2 * (c * w * h + h * b) + c * w + 2 * h + b


def parse_task_spec(data: bytes) -> TaskSpec:
    """A spec document (any JSON spelling) as a TaskSpec: size first, then the strict schema. Raises TooLargeError or
    MalformedError naming the fields that failed."""
    if len(data) > MAX_TASK_SPEC_BYTES:
        raise TooLargeError("task spec exceeds the size limit", limit=MAX_TASK_SPEC_BYTES, found=len(data))
    try:
        return TaskSpec.model_validate_json(data, strict=True)
    except ValidationError as exc:
        raise MalformedError(
            "task spec does not match its schema",
            errors=[(".".join(str(p) for p in e["loc"]), e["msg"][:120]) for e in exc.errors(include_input=False)[:10]],
        ) from None


SPECS_DIR = Path(__file__).with_name("specs")
"""The built-in specs, one JSON file each, named `{id}@{version}.json`."""


def _load_builtin(key: str) -> TaskSpec:
    spec = parse_task_spec((SPECS_DIR / f"{key}.json").read_bytes())
    if spec.key != key:
        raise MalformedError("built-in spec file names another task", expected=key, found=spec.key)
    return spec


# PLAID (Plug-Load Appliance Identification Dataset, the UCR release sktime ships) has 11 appliance classes and
# one current channel per recording, 100..1344 samples long; a window is one whole recording resampled by linear
# interpolation to 128 points (edge.sensors.plaid), which keeps the start-up transient of every recording. Its recipe
# was measured in BENCHMARKS.md ("Accuracy, session 6"; docs/federated.md, "Accuracy"): on 5 label-skewed devices it
# reached PLAID test accuracy 0.78-0.83, a mean 1.6 points below central training over 7 deployed runs. Five rounds
# of the old defaults (constant lr 0.003, batch 32, plain FedAvg) reached 0.32.
PLAID_APPLIANCE: TaskSpec
ENV_FORECAST: TaskSpec
HOST_ANOMALY: TaskSpec
REGISTRY: dict[tuple[str, int], TaskSpec]
"""The built-in tasks, which every MID signs into its catalogue at first start (coordinator.tasks)."""

_BUILTIN_NAMES = {
    "PLAID_APPLIANCE": ("plaid-appliance", 1),
    "ENV_FORECAST": ("env-forecast", 1),
    "HOST_ANOMALY": ("host-anomaly", 1),
}
"""The module's names of the built-in specs (and `REGISTRY`), parsed at their first use by `_builtin_registry`."""


@functools.cache
def _builtin_registry() -> dict[tuple[str, int], TaskSpec]:
    """The built-in specs, parsed once at first use rather than at import: an idle agent imports this module for
    its types and limits, and parsing the specs builds their validators, 0.5 MB it would keep for nothing
    (BENCHMARKS.md, "Idle agent")."""
    specs = [_load_builtin(f"{task_id}@{version}") for task_id, version in _BUILTIN_NAMES.values()]
    return {(s.id, s.version): s for s in specs}


def __getattr__(name: str) -> object:
    if name == "REGISTRY":
        return _builtin_registry()
    if name in _BUILTIN_NAMES:
        return _builtin_registry()[_BUILTIN_NAMES[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UnknownTaskError(MalformedError):
    """A job names a task id or version that is not in the registry (or the MID's catalogue)."""

    reason = Reason.UNKNOWN_TASK


def get_task(task_id: str, version: int) -> TaskSpec:
    """The built-in spec for (task_id, version); raises UnknownTaskError naming what is known."""
    registry = _builtin_registry()
    spec = registry.get((task_id, version))
    if spec is None:
        raise UnknownTaskError(
            "unknown task", task_id=task_id, version=version, known=sorted(s.key for s in registry.values())
        )
    return spec


def task_file(folder: Path, task_id: str, version: int) -> Path:
    """Where a verified spec is handed to the Flower process that trains or aggregates it (`load_task`)."""
    return folder / f"{task_id}@{version}.json"


def write_task_file(folder: Path, spec: TaskSpec) -> Path:
    """Write `spec` (already verified by the caller) into `folder` for `load_task`, atomically."""
    path = task_file(folder, spec.id, spec.version)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(spec.canonical_json())
    tmp.replace(path)
    return path


def load_task(folder: Path, task_id: str, version: int) -> TaskSpec:
    """The spec of task_id@version that the process which started this one verified and wrote into `folder` (the
    agent for a device's ClientApp, `job start` for the ServerApp), else the built-in one (UnknownTaskError if none)."""
    try:
        data = task_file(folder, task_id, version).read_bytes()
    except FileNotFoundError:
        return get_task(task_id, version)
    spec = parse_task_spec(data)
    if (spec.id, spec.version) != (task_id, version):
        raise MalformedError("task file holds another task", expected=f"{task_id}@{version}", found=spec.key)
    return spec
