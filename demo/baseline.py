"""The central baseline the demo's federated model is compared with: the task's model trained in one place on the
union of the windows the job's devices trained on (each agent's window file for the job), with the task's own
training code (protocol.tasks.models) and the recipe's batch size and learning rate, evaluated on the buyer's
validation windows (which the buyer cut with `agent sensors windows`, as the job used them). It runs in the demo's
process because no MID would ever hold that union: it exists only to say
what pooling the data would have given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.tasks.models import build_model, evaluate, train_epochs
from protocol.tasks.spec import TaskSpec
from protocol.tasks.windows import load_window_file


@dataclass(frozen=True)
class CentralResult:
    epochs: int
    windows: int
    accuracy: float


def train_central(task: TaskSpec, window_files: list[Path], validation_file: Path, epochs: int) -> CentralResult:
    """Central training on the union of `window_files` for `epochs` passes (one Adam at the recipe's lr), evaluated
    on the buyer's validation window file, the one its job was valued on."""
    import torch

    torch.set_num_threads(1)  # the job's processes share the same two cores
    sets = [load_window_file(path, task) for path in window_files]
    x = np.concatenate([s.x for s in sets])
    y = np.concatenate([s.y for s in sets if s.y is not None])
    model = build_model(task, seed=0)
    recipe = task.recipe
    train_epochs(task, model, x, y, epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=0)
    validation = load_window_file(validation_file, task)
    accuracy = evaluate(task, model, validation.x, validation.y)["accuracy"]
    return CentralResult(epochs, len(x), accuracy)
