"""The central baseline the demo's federated model is compared with: the task's model trained in one place on the
union of the windows the job's devices trained on (each agent's window file for the job), with the task's own
training code (protocol.tasks.models) and the recipe's batch size and learning rate, evaluated on the buyer's
validation windows. It runs in the demo's process because no MID would ever hold that union: it exists only to say
what pooling the data would have given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.sensors.plaid import load_plaid
from protocol.tasks.models import build_model, evaluate, train_epochs
from protocol.tasks.spec import TaskSpec
from protocol.tasks.windows import WindowSet, load_window_file, save_window_file, window_fingerprint


def write_buyer_validation(task: TaskSpec, path: Path) -> WindowSet:
    """The buyer's validation windows: PLAID's test recordings, which no household replays."""
    plaid = load_plaid("test", length=task.window_length)
    x = plaid.X[:, None, :].astype(np.float32)
    windows = WindowSet(x=x, y=plaid.y, fingerprint=window_fingerprint(x, plaid.y))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_window_file(path, windows)
    return windows


@dataclass(frozen=True)
class CentralResult:
    epochs: int
    windows: int
    accuracy: float


def train_central(task: TaskSpec, window_files: list[Path], validation: WindowSet, epochs: int) -> CentralResult:
    """Central training on the union of `window_files` for `epochs` passes (one Adam at the recipe's lr)."""
    import torch

    torch.set_num_threads(1)  # the job's processes share the same two cores
    sets = [load_window_file(path, task) for path in window_files]
    x = np.concatenate([s.x for s in sets])
    y = np.concatenate([s.y for s in sets if s.y is not None])
    model = build_model(task, seed=0)
    recipe = task.recipe
    train_epochs(task, model, x, y, epochs=epochs, batch_size=recipe.batch_size, lr=recipe.lr, seed=0)
    accuracy = evaluate(task, model, validation.x, validation.y)["accuracy"]
    return CentralResult(epochs, len(x), accuracy)
