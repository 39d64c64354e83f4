"""Local-training experiments that `fl_bench.py simulate` measured and the deployment does not run: a device's Adam
state kept from one round to the next (`--optimizer-state kept`, `second-moment`) and a per-round lr warm-up
(`--warmup-steps`). None beat a fresh Adam per round on every seed (BENCHMARKS.md, "Accuracy"), so they live here,
built from the production training pieces (protocol.tasks.models), and the ClientApp trains as `train_round` does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from edge.federated.training import LocalTrainingConfig, round_sample
from protocol.errors import MalformedError
from protocol.tasks.models import (
    build_model,
    load_arrays,
    minibatches,
    model_arrays,
    parameter_offsets,
    to_tensors,
    train_step,
)
from protocol.tasks.spec import TaskSpec
from protocol.tasks.windows import WindowSet

AdamState = dict[str, object]
"""torch.optim.Adam.state_dict(): per-parameter exp_avg, exp_avg_sq and step; param_groups."""


def train_epochs_with_state(
    spec: TaskSpec,
    model: nn.Module,
    x: npt.NDArray[np.generic],
    y: npt.NDArray[np.generic] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    gradient_offset: Mapping[str, npt.NDArray[np.generic]] | None = None,
    adam_state: AdamState | None = None,
    warmup_steps: int = 0,
) -> AdamState:
    """protocol.tasks.models.train_epochs with Adam's state carried in and out.

    `adam_state`: the moment estimates and step count a previous call returned for a model of the same task; None
    starts a fresh Adam. The lr is always `lr`, never the saved one. Returns Adam's state after the last step.
    `warmup_steps`: the lr ramps linearly from lr / warmup_steps to lr over the first steps (0: none).
    """
    xt, yt = to_tensors(spec, x, y)
    if len(xt) == 0:
        raise MalformedError("no windows to train on")
    offsets = parameter_offsets(model, gradient_offset) if gradient_offset is not None else []
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    if adam_state is not None:
        optimiser.load_state_dict(adam_state)
        for group in optimiser.param_groups:
            group["lr"] = lr
    model.train()
    for step, batch in enumerate(minibatches(len(xt), epochs, batch_size, seed), start=1):
        if step <= warmup_steps:
            for group in optimiser.param_groups:
                group["lr"] = lr * step / warmup_steps
        train_step(spec, model, optimiser, xt[batch], yt[batch], offsets)
    return optimiser.state_dict()


def train_round_with_state(
    spec: TaskSpec,
    global_arrays: Mapping[str, npt.NDArray[np.generic]],
    windows: WindowSet,
    settings: LocalTrainingConfig,
    server_round: int,
    gradient_offset: Mapping[str, npt.NDArray[np.generic]] | None,
    adam_state: AdamState | None,
    warmup_steps: int,
) -> tuple[dict[str, npt.NDArray[np.generic]], AdamState]:
    """edge.federated.training.train_round (the same sample, lr and seed) with the device's Adam state and a warm-up;
    returns the trained arrays and Adam's state."""
    x, y = round_sample(windows, settings, server_round)
    model = build_model(spec)
    load_arrays(model, global_arrays)
    state = train_epochs_with_state(
        spec,
        model,
        x,
        y,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.round_lr(server_round),
        seed=settings.seed + server_round,
        gradient_offset=gradient_offset,
        adam_state=adam_state,
        warmup_steps=warmup_steps,
    )
    return model_arrays(model), state


def without_first_moment(adam: AdamState) -> AdamState:
    """Adam's state with its momentum (exp_avg) zeroed: the per-weight step sizes (exp_avg_sq) and step count stay,
    the direction the device's own data pushed in last round does not."""
    per_param = adam["state"]
    assert isinstance(per_param, dict)
    state = {index: {**entry, "exp_avg": torch.zeros_like(entry["exp_avg"])} for index, entry in per_param.items()}
    return {**adam, "state": state}
