"""The validation loss of a coalition's model, evaluated in blocks of windows, is the loss of one pass over all of
them: the same number for every task kind, and the same exact Shapley values on a real PLAID game."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.attribution import CoalitionGame, exact_shapley
from coordinator.attribution.task_loss import WINDOWS_PER_BLOCK, TaskValidationLoss
from edge.sensors.plaid import load_plaid
from protocol.tasks.models import build_model, load_arrays, loss_fn, model_arrays, to_tensors, train_epochs
from protocol.tasks.spec import ENV_FORECAST, HOST_ANOMALY, PLAID_APPLIANCE, TaskSpec


def one_pass_loss(spec: TaskSpec, x: np.ndarray, y: np.ndarray | None, flat: np.ndarray) -> float:
    """The loss as it was computed before blocks: one forward pass over every window."""
    model = build_model(spec, 0)
    reference = TaskValidationLoss(spec, build_model(spec, 0), x, y)
    load_arrays(model, reference.unflatten(flat))
    model.eval()
    xt, yt = to_tensors(spec, x, y)
    with torch.no_grad():
        return float(loss_fn(spec, model(xt), yt))


def random_windows(spec: TaskSpec, count: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((count, spec.channels, spec.window_length)).astype(np.float32)
    if spec.labels:
        return x, rng.integers(0, len(spec.labels), count)
    if spec.kind.value == "forecast":
        return x, rng.standard_normal((count, spec.channels)).astype(np.float32)
    return x, None


@pytest.mark.parametrize("spec", [PLAID_APPLIANCE, ENV_FORECAST, HOST_ANOMALY], ids=lambda s: s.key)
@pytest.mark.parametrize("count", [1, WINDOWS_PER_BLOCK, 2 * WINDOWS_PER_BLOCK + 37])
def test_blocked_loss_is_the_loss_of_one_pass(spec: TaskSpec, count: int) -> None:
    x, y = random_windows(spec, count, seed=count)
    loss = TaskValidationLoss(spec, build_model(spec, 0), x, y)
    start = loss.flatten(model_arrays(build_model(spec, 0)))
    rng = np.random.default_rng(1)
    for _ in range(3):
        flat = (start + 0.05 * rng.standard_normal(start.shape)).astype(np.float32)
        assert loss(flat) == pytest.approx(one_pass_loss(spec, x, y, flat), rel=1e-5)


def test_exact_shapley_on_plaid_is_unchanged_by_blocks() -> None:
    """Four members train one real epoch each on PLAID; exact Shapley over the 537 test windows in blocks equals
    exact Shapley over one pass, to float32 rounding of the losses."""
    spec = PLAID_APPLIANCE
    train, test = load_plaid("train", length=spec.window_length), load_plaid("test", length=spec.window_length)
    x_val = test.X[:, None, :]
    assert len(x_val) > WINDOWS_PER_BLOCK
    blocked = TaskValidationLoss(spec, build_model(spec, 0), x_val, test.y)
    global_flat = blocked.flatten(model_arrays(build_model(spec, 0)))
    parts = np.array_split(np.random.default_rng(0).permutation(len(train.y))[:160], 4)
    deltas = np.empty((4, global_flat.shape[0]), dtype=np.float32)
    model = build_model(spec, 0)
    for i, part in enumerate(parts):
        load_arrays(model, blocked.unflatten(global_flat))
        train_epochs(spec, model, train.X[part][:, None, :], train.y[part], epochs=1, batch_size=16, lr=3e-3, seed=i)
        deltas[i] = blocked.flatten(model_arrays(model)) - global_flat
    weights = [0.25] * 4

    values = exact_shapley(CoalitionGame(blocked, global_flat, deltas, weights))
    reference = exact_shapley(
        CoalitionGame(lambda flat: one_pass_loss(spec, x_val, test.y, flat), global_flat, deltas, weights)
    )
    assert np.max(np.abs(values)) > 0
    np.testing.assert_allclose(values, reference, rtol=0, atol=1e-4 * float(np.max(np.abs(reference))))
