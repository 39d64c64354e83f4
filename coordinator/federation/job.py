"""A job's run config as the ServerApp reads it, and the outcome it leaves behind.

`flwr run` exits 0 even when the ServerApp fails, so the ServerApp always writes `outcome.json` into the run's
output directory (finished or failed, with a reason); the coordinator reads that, and the run status from the
SuperLink, rather than trusting the CLI's exit code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.job_log import SameDataKept
from protocol.tasks.schedule import LrSchedule

TASKS_DIR = "tasks"
"""Under the run config's `output-dir`: the task specs `job start` took from the MID's catalogue (verified there), which
the ServerApp builds its model from (protocol.tasks.spec.load_task)."""

U64_MAX = (1 << 64) - 1


class Aggregation(StrEnum):
    """How a job's updates become the next global model: FedAvg, or one of Flower's robust strategies
    (flwr.serverapp.strategy) for a buyer or policy that asks for one (docs/attribution.md, "Robust aggregation")."""

    FEDAVG = "fedavg"
    FEDMEDIAN = "fedmedian"
    FEDTRIMMEDAVG = "fedtrimmedavg"
    KRUM = "krum"
    BULYAN = "bulyan"


def aggregation_conflict(aggregation: Aggregation, dp_clipping_norm: float, server_momentum: float) -> str:
    """Why a job cannot aggregate this way with these settings ("" when it can)."""
    if aggregation is Aggregation.FEDAVG or (dp_clipping_norm <= 0 and server_momentum <= 0):
        return ""
    return (
        f"aggregation {aggregation} cannot be combined with DP or server momentum: Flower's DP accountant and "
        "FedAvgM both assume FedAvg"
    )


class JobRunConfig(BaseModel):
    """Run-config keys of the midgate Flower app ([tool.flwr.app.config] in coordinator/federation/app).

    Parameters
    ----------
    task_id, task_version: the task (protocol.tasks registry).
    num_rounds: federated rounds (default 3).
    selected_nodes: space-separated SuperLink node ids the coordinator selected (uint64 does not fit TOML ints).
    min_nodes: fewest usable updates per round, at most the selected nodes; below it the job fails (default 2).
    round_timeout: seconds to wait for a round's replies before dropping the silent nodes (default 120).
    join_timeout: seconds to wait for selected nodes to connect at the start of a round (default 60).
    validation_path: the buyer's validation window file, on the coordinator.
    output_dir: where the run's captures, final model and outcome go (a subdirectory per run id).
    max_examples: cap on self-reported example counts used as aggregation weights.
    seed: model initialisation seed.
    dp_noise_multiplier, dp_clipping_norm: central DP with client-side fixed clipping when clipping norm > 0
        (Flower's fixedclipping_mod + DifferentialPrivacyClientSideFixedClipping); with noise > 0 the privacy spent
        is accounted by Flower's RDP accountant at `dp_delta` (default 1e-5) and reported in the outcome.
    server_momentum: FedAvgM's server momentum (default 0: plain FedAvg; ignored under DP, whose accountant needs
        FedAvg); helps on non-IID splits (bench/fl_bench.py accuracy).
    attribution: value every round on the buyer's validation set with coordinator.attribution (Shapley family)
        and report each node's accumulated value in the outcome (default False).
    drift_correction: strength in [0, 1] of the SCAFFOLD-style drift correction (protocol.tasks.drift; default 0:
        off). Each round then costs one more message to every node (its gradient at the global model, sent before
        training); it closes most of the federated-vs-central gap on label-skewed devices (docs/federated.md,
        bench/fl_bench.py accuracy). Refused with DP (dp_clipping_norm > 0): the gradient would leave the device
        unclipped and unnoised.
    lr_schedule: the devices' lr over the rounds, `constant` (default) or `cosine` (protocol.tasks.schedule); each
        device derives its round's lr from it with `lr` and `num-rounds` (edge.federated.training). Checked here so
        a job naming an unknown schedule fails before its first round, not on every device.
    flower_acceleration: run on Flower's grid wrapped in the coordinator-side accelerations (0.1 s reply poll,
        packed arrays, prompt object pulls: coordinator.federation.acceleration; default True); False: on Flower's
        own grid. `job start` sets it from `[federation] flower_acceleration`.
    tail_average: the job's final model is the mean of the last K rounds' global models (default 1: the last one);
        it is evaluated on the buyer's validation set (JobOutcome.final_validation) and is `final-model.npz`. The
        rounds' own global models, and so every contribution record and capture, are unchanged.
    torch_threads: torch's intra-op threads in the ServerApp (its evaluations and the attribution's valuations), as on
        the devices (`torch-threads`, default 1): the models are tiny, and the ServerApp shares the MID's cores with
        the SuperLink and `serve`; with a thread per core, its evaluations spun 5-25 times slower on a loaded 2-core
        machine (tests/conftest.py has the measurement).
    member_groups: the selected nodes of each member with more than one device, space-separated groups of
        comma-separated node ids (`job start` writes them from whom it invited): with attribution, one member's
        devices are one player (coordinator.attribution.screens, `owners`). Default none: every node is a member of
        its own.
    aggregation: `fedavg` (default) or a robust strategy of Flower's: `fedmedian`, `fedtrimmedavg` (beta 0.2),
        `krum` or `bulyan` (both assuming (selected nodes - 3) // 4 malicious nodes). Refused with DP (its accountant
        assumes FedAvg) and with server momentum (FedAvgM is FedAvg's).
    """

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    task_id: str = Field(alias="task-id")
    task_version: int = Field(alias="task-version", ge=1)
    num_rounds: int = Field(alias="num-rounds", default=3, ge=1, le=10_000)
    selected_nodes: tuple[int, ...] = Field(alias="selected-nodes", min_length=1)
    min_nodes: int = Field(alias="min-nodes", default=2, ge=1)
    round_timeout: float = Field(alias="round-timeout", default=120.0, gt=0)
    join_timeout: float = Field(alias="join-timeout", default=60.0, ge=0)
    validation_path: Path = Field(alias="validation-path")
    output_dir: Path = Field(alias="output-dir")
    max_examples: int = Field(alias="max-examples", default=100_000, ge=1)
    seed: int = Field(default=0, ge=0)
    dp_noise_multiplier: float = Field(alias="dp-noise-multiplier", default=0.0, ge=0)
    dp_clipping_norm: float = Field(alias="dp-clipping-norm", default=0.0, ge=0)
    dp_delta: float = Field(alias="dp-delta", default=1e-5, gt=0, lt=1)
    server_momentum: float = Field(alias="server-momentum", default=0.0, ge=0, lt=1)
    attribution: bool = False
    drift_correction: float = Field(alias="drift-correction", default=0.0, ge=0, le=1)
    flower_acceleration: bool = Field(alias="flower-acceleration", default=True)
    lr_schedule: LrSchedule = Field(alias="lr-schedule", default=LrSchedule.CONSTANT)
    tail_average: int = Field(alias="tail-average", default=1, ge=1, le=1000)
    torch_threads: int = Field(alias="torch-threads", default=1, ge=1, le=256)
    aggregation: Aggregation = Aggregation.FEDAVG
    member_groups: tuple[tuple[int, ...], ...] = Field(alias="member-groups", default=())

    @model_validator(mode="after")
    def _robust_aggregation_alone(self) -> JobRunConfig:
        conflict = aggregation_conflict(self.aggregation, self.dp_clipping_norm, self.server_momentum)
        if conflict:
            raise ValueError(conflict)
        return self

    @model_validator(mode="after")
    def _min_nodes_can_be_met(self) -> JobRunConfig:
        if self.min_nodes > len(self.selected_nodes):
            raise ValueError(f"min-nodes {self.min_nodes} exceeds the {len(self.selected_nodes)} selected nodes")
        return self

    @model_validator(mode="after")
    def _no_drift_correction_under_dp(self) -> JobRunConfig:
        if self.drift_correction > 0 and self.dp_clipping_norm > 0:
            raise ValueError(
                "drift-correction cannot be combined with DP (dp-clipping-norm > 0): the gradient query would send "
                "unclipped, unnoised gradients"
            )
        return self

    @model_validator(mode="after")
    def _member_groups_name_selected_nodes(self) -> JobRunConfig:
        grouped = [node for group in self.member_groups for node in group]
        if any(len(group) < 2 for group in self.member_groups) or len(set(grouped)) != len(grouped):
            raise ValueError("member-groups must be groups of two or more nodes, each node in one group at most")
        if not set(self.selected_nodes).issuperset(grouped):
            raise ValueError("member-groups must name selected nodes")
        return self

    @field_validator("member_groups", mode="before")
    @classmethod
    def _split_groups(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return tuple(tuple(int(node) for node in group.split(",")) for group in value.split())
            except ValueError:
                raise ValueError("member-groups: space-separated groups of comma-separated node ids") from None
        return value

    def owner_of(self) -> dict[int, str]:
        """Node id -> an owner key shared by one member's nodes (`member_groups`); a node alone keys itself."""
        owners = {node: str(node) for node in self.selected_nodes}
        for group in self.member_groups:
            owners.update((node, f"member-of-{group[0]}") for node in group)
        return owners

    @field_validator("selected_nodes", mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str):
            ids = tuple(int(part) for part in value.split())
            if any(not 0 <= i <= U64_MAX for i in ids) or len(set(ids)) != len(ids):
                raise ValueError("node ids must be distinct uint64 values")
            return ids
        return value

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> JobRunConfig:
        return cls.model_validate(dict(run_config))


class NodeDropRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    round: int
    node_id: int
    reason: str
    detail: str = ""


class SameDataSimilarity(BaseModel):
    """A pair of node ids (as text) the round's screens reported alike, and its similarity in milli-units."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pair: tuple[str, str]
    similarity_milli: int


class RoundAttribution(BaseModel):
    """One valued round: the method, and per node id (as text, like JSON object keys) its value in nano-units
    (undecayed), the screens that flagged it and whether one of them excluded it; the round's players of more than
    one node (`groups`) and the same-data similarities its screens reported: what the job's settlement read of it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    method: str
    values: dict[str, int] = Field(default_factory=dict)
    screens: dict[str, list[str]] = Field(default_factory=dict)
    excluded: list[str] = Field(default_factory=list)
    groups: list[list[str]] = Field(default_factory=list)
    same_data: list[SameDataSimilarity] = Field(default_factory=list)


class JobGroup(BaseModel):
    """A job pair of node ids (as text) and the valued rounds in which it was paid as one member."""

    model_config = ConfigDict(extra="forbid", strict=True)

    pair: tuple[str, str]
    rounds: list[int]


class NodeHistory(BaseModel):
    """A node's part in the job's valuation: rounds valued, rounds a screen excluded it, every screen that flagged
    it (what a settlement's `MemberAttribution` records)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rounds: int = 0
    excluded_rounds: int = 0
    screens: list[str] = Field(default_factory=list)


class JobOutcome(BaseModel):
    """What happened to one Flower run of a job."""

    model_config = ConfigDict(extra="forbid", strict=True)

    run_id: int
    status: Literal["finished", "failed"]
    reason: str = ""
    detail: str = ""  # human-readable specifics of a failure (e.g. which run-config key was refused)
    rounds_completed: int = 0
    drops: list[NodeDropRecord] = Field(default_factory=list)
    validation: dict[int, dict[str, float]] = Field(default_factory=dict)
    final_model_sha256: str = ""
    # the final model's metrics: the last round's (validation[num_rounds]), or the tail average's (`tail-average`)
    final_validation: dict[str, float] = Field(default_factory=dict)
    round_seconds: dict[int, float] = Field(default_factory=dict)  # wall time of each round, aggregation included
    # whether the ServerApp ran on Flower acceleration's grid (coordinator.federation.acceleration)
    flower_acceleration: bool = False
    privacy: dict[str, float] = Field(default_factory=dict)
    attribution: dict[str, int] = Field(default_factory=dict)  # member (node id) -> value in nano-units
    attribution_history: dict[str, NodeHistory] = Field(default_factory=dict)  # node id -> its rounds and screens
    attribution_rounds: dict[int, RoundAttribution] = Field(default_factory=dict)  # round -> its valuation
    attribution_skipped: dict[int, str] = Field(default_factory=dict)
    job_groups: list[JobGroup] = Field(default_factory=list)  # the job's same-data pairs (history.job_groups)
    # what a set paid as one member kept of a round (protocol.job_attribution); an outcome that names none: "larger"
    same_data_kept: SameDataKept = "larger"
    seconds: float = 0.0

    def write(self, directory: Path) -> Path:
        path = directory / "outcome.json"
        tmp = directory / ".outcome.json.tmp"
        tmp.write_text(self.model_dump_json(indent=1))
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, directory: Path) -> JobOutcome:
        return cls.model_validate(json.loads((directory / "outcome.json").read_text()), strict=False)
