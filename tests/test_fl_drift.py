"""The drift correction's arithmetic (protocol.tasks.drift) and its use in local training (edge.federated.training):
offsets sum to zero under the round's weights, one node's offset and one training step match a hand computation,
bad inputs are refused with a reason, DP jobs refuse the correction, and a device's record must name the gradient
and offset the strategy captured."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from mqtt_fixtures import contribution_body
from pydantic import ValidationError

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, RoundCapture
from coordinator.federation.job import JobRunConfig
from coordinator.gate.update_check import check_contribution
from edge.federated.training import LocalTrainingConfig, round_gradient, round_sample, train_round
from protocol.errors import MalformedError, Reason, UpdateMismatchError
from protocol.messages import ContributionBody
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.drift import drift_offsets, mean_gradient
from protocol.tasks.models import build_model, full_gradient, load_arrays, loss_fn, model_arrays, to_tensors
from protocol.tasks.spec import get_task
from protocol.tasks.windows import WindowSet, window_fingerprint

SPEC = get_task("plaid-appliance", 1)


def _windows(n: int, seed: int) -> WindowSet:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, SPEC.channels, SPEC.window_length)).astype(np.float32) * (1 + seed)
    y = rng.integers(0, len(SPEC.labels), n)
    return WindowSet(x=x, y=y, fingerprint=window_fingerprint(x, y))


def _settings(**overrides: object) -> LocalTrainingConfig:
    config: dict[str, object] = {"task-id": SPEC.id, "task-version": SPEC.version, "lr": 0.01, "batch-size": 64}
    config.update(overrides)
    return LocalTrainingConfig.from_run_config(config)


def test_one_nodes_offset_is_the_weighted_mean_minus_its_own_gradient() -> None:
    gradients = {
        7: {"w": np.array([1.0, 2.0], np.float32), "b": np.array([[0.0]], np.float32)},
        8: {"w": np.array([4.0, -1.0], np.float32), "b": np.array([[3.0]], np.float32)},
    }
    weights = {7: 1, 8: 2}
    # By hand: mean w = (1*[1, 2] + 2*[4, -1]) / 3 = [3, 0]; mean b = (0 + 6) / 3 = 2.
    np.testing.assert_allclose(mean_gradient(gradients, weights)["w"], [3.0, 0.0])
    offsets = drift_offsets(gradients, weights, strength=1.0)
    np.testing.assert_allclose(offsets[7]["w"], [2.0, -2.0])
    np.testing.assert_allclose(offsets[7]["b"], [[2.0]])
    np.testing.assert_allclose(offsets[8]["w"], [-1.0, 1.0])
    assert offsets[7]["w"].dtype == np.float32
    np.testing.assert_allclose(drift_offsets(gradients, weights, strength=0.5)[8]["b"], [[-0.5]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_offsets_sum_to_zero_so_the_correction_does_not_bias_the_average(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shapes = {name: a.shape for name, a in model_arrays(build_model(SPEC)).items()}
    gradients = {
        node: {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        for node in range(5)
    }
    weights = {node: int(rng.integers(1, 200)) for node in gradients}
    offsets = drift_offsets(gradients, weights, strength=1.0)
    for name in shapes:
        total = sum(weights[n] * offsets[n][name].astype(np.float64) for n in offsets)
        assert np.abs(total).max() < 1e-3 * sum(weights.values())
        # g_i + offset_i is the same mean gradient for every node
        for node in offsets:
            np.testing.assert_allclose(
                gradients[node][name] + offsets[node][name], gradients[0][name] + offsets[0][name], atol=1e-5
            )


def test_offsets_are_the_same_bits_whatever_order_the_gradients_arrived_in() -> None:
    """The strategy sees replies in arrival order and records the offsets' hashes; an audit re-derives them from the
    capture, in the capture's order. Float sums depend on order, so the mean must not."""
    rng = np.random.default_rng(3)
    shapes = {name: a.shape for name, a in model_arrays(build_model(SPEC)).items()}
    gradients = {
        node: {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        for node in (91, 5, 40, 17, 63)
    }
    weights = {node: int(rng.integers(1, 200)) for node in gradients}
    expected = {n: arrays_sha256(o) for n, o in drift_offsets(gradients, weights, 1.0).items()}
    for seed in range(6):
        order = list(gradients)
        random.Random(seed).shuffle(order)
        shuffled = {n: gradients[n] for n in order}
        assert {n: arrays_sha256(o) for n, o in drift_offsets(shuffled, weights, 1.0).items()} == expected


def test_gradients_that_do_not_line_up_are_refused_with_what_differs() -> None:
    good = {"w": np.zeros(2, np.float32)}
    with pytest.raises(MalformedError) as err:
        mean_gradient({1: good, 2: {"w": np.zeros(3, np.float32)}}, {1: 1, 2: 1})
    assert err.value.details["node_id"] == 2
    with pytest.raises(MalformedError):
        mean_gradient({1: good}, {1: 1, 2: 1})
    with pytest.raises(MalformedError):
        mean_gradient({1: good}, {1: 0})
    with pytest.raises(MalformedError):
        mean_gradient({}, {})
    for strength in (0.0, -1.0, 1.5):
        with pytest.raises(MalformedError):
            drift_offsets({1: good}, {1: 1}, strength)


def test_full_gradient_names_every_array_of_the_model_and_matches_autograd() -> None:
    windows = _windows(20, 0)
    model = build_model(SPEC)
    before = model_arrays(model)
    grads = full_gradient(SPEC, model, windows.x, windows.y)
    assert {n: g.shape for n, g in grads.items()} == {n: a.shape for n, a in before.items()}
    assert all(np.array_equal(before[n], a) for n, a in model_arrays(model).items())  # weights unchanged
    xt, yt = to_tensors(SPEC, windows.x, windows.y)
    name, param = next(iter(model.named_parameters()))
    (expected,) = torch.autograd.grad(loss_fn(SPEC, model(xt), yt), [param])
    np.testing.assert_allclose(grads[name], expected.numpy(), rtol=1e-5, atol=1e-7)


def test_one_full_batch_adam_step_follows_the_corrected_gradient() -> None:
    """One epoch in one batch is one Adam step; its first step moves each weight by lr * d / (|d| + eps), d = g + o."""
    windows = _windows(16, 1)
    settings = _settings(**{"batch-size": 64, "lr": 0.01})
    global_arrays = model_arrays(build_model(SPEC, seed=3))
    gradient = round_gradient(SPEC, global_arrays, windows, settings, server_round=1)
    assert gradient.examples == 16
    rng = np.random.default_rng(5)
    offset = {n: rng.standard_normal(a.shape).astype(np.float32) * 0.01 for n, a in global_arrays.items()}
    update = train_round(SPEC, global_arrays, windows, settings, 1, gradient_offset=offset).arrays
    for name, start in global_arrays.items():
        corrected = gradient.arrays[name].astype(np.float64) + offset[name]
        expected = start - 0.01 * corrected / (np.abs(corrected) + 1e-8)
        np.testing.assert_allclose(update[name], expected, atol=2e-5)


def test_an_offset_steers_the_step_whatever_the_nodes_own_gradient() -> None:
    """With o = t - g the corrected gradient is t: a first Adam step with t = +1 everywhere moves every weight by
    exactly -lr, wherever the node's own data would have pushed it."""
    windows = _windows(16, 2)
    settings = _settings()
    global_arrays = model_arrays(build_model(SPEC, seed=4))
    gradient = round_gradient(SPEC, global_arrays, windows, settings, server_round=1).arrays
    steer = {n: (1.0 - g).astype(np.float32) for n, g in gradient.items()}
    update = train_round(SPEC, global_arrays, windows, settings, 1, gradient_offset=steer).arrays
    for name, start in global_arrays.items():
        np.testing.assert_allclose(update[name], start - 0.01, atol=1e-6)
    plain = train_round(SPEC, global_arrays, windows, settings, 1).arrays
    assert not np.allclose(plain[name], start - 0.01, atol=1e-6)


def test_the_gradient_query_and_training_use_the_same_round_sample() -> None:
    windows = _windows(40, 3)
    settings = _settings(**{"max-examples": 10})
    x1, y1 = round_sample(windows, settings, 4)
    x2, _ = round_sample(windows, settings, 4)
    assert len(x1) == 10 and np.array_equal(x1, x2)
    model = build_model(SPEC)
    load_arrays(model, model_arrays(build_model(SPEC)))
    gradient = round_gradient(SPEC, model_arrays(model), windows, settings, 4)
    assert gradient.examples == 10
    expected = full_gradient(SPEC, model, x1, y1)
    assert all(np.array_equal(gradient.arrays[n], expected[n]) for n in expected)


def test_an_offset_that_does_not_name_the_models_arrays_is_refused() -> None:
    windows = _windows(8, 0)
    global_arrays = model_arrays(build_model(SPEC))
    offset = {n: np.zeros_like(a) for n, a in global_arrays.items()}
    offset.pop(next(iter(offset)))
    with pytest.raises(MalformedError):
        train_round(SPEC, global_arrays, windows, _settings(), 1, gradient_offset=offset)
    name = next(iter(global_arrays))
    wrong = {n: np.zeros_like(a) for n, a in global_arrays.items()} | {name: np.zeros(3, np.float32)}
    with pytest.raises(MalformedError) as err:
        train_round(SPEC, global_arrays, windows, _settings(), 1, gradient_offset=wrong)
    assert err.value.details["name"] == name


def test_a_dp_job_refuses_drift_correction(tmp_path: Path) -> None:
    base = {
        "task-id": SPEC.id,
        "task-version": SPEC.version,
        "selected-nodes": "1 2",
        "validation-path": str(tmp_path / "v.npz"),
        "output-dir": str(tmp_path),
    }
    assert JobRunConfig.from_run_config(base | {"drift-correction": 1.0}).drift_correction == 1.0
    assert JobRunConfig.from_run_config(base | {"dp-clipping-norm": 0.1}).drift_correction == 0.0
    with pytest.raises(ValidationError, match="drift-correction cannot be combined with DP"):
        JobRunConfig.from_run_config(base | {"drift-correction": 1.0, "dp-clipping-norm": 0.1})
    with pytest.raises(ValidationError):
        JobRunConfig.from_run_config(base | {"drift-correction": 1.5})


def _drift_capture(tmp_path: Path) -> tuple[CaptureDirectory, dict[str, np.ndarray], CapturedUpdate]:
    global_arrays = model_arrays(build_model(SPEC))
    global_sha = arrays_sha256(global_arrays)
    gradient = {n: np.full_like(a, 0.5) for n, a in global_arrays.items()}
    offset = {n: np.full_like(a, -0.25) for n, a in global_arrays.items()}
    update = CapturedUpdate(
        3,
        11,
        global_arrays,
        arrays_sha256(global_arrays),
        global_sha,
        40,
        40,
        {},
        gradient=gradient,
        gradient_sha256=arrays_sha256(gradient),
        drift_offset_sha256=arrays_sha256(offset),
    )
    directory = CaptureDirectory(tmp_path / "run")
    directory.on_round(RoundCapture(5, 3, global_sha, (update,), ()))
    return directory, gradient, update


def _record(update: CapturedUpdate, **changes: object) -> ContributionBody:
    fields: dict[str, object] = {
        "run_id": 5,
        "round": 3,
        "node_id": update.node_id,
        "task_id": SPEC.id,
        "task_version": SPEC.version,
        "global_model_sha256": update.global_sha256,
        "update_sha256": update.update_sha256,
        "gradient_sha256": update.gradient_sha256,
        "drift_offset_sha256": update.drift_offset_sha256,
    }
    return contribution_body(0, **{**fields, **changes})


def test_a_drift_corrected_record_must_name_the_captured_gradient_and_offset(tmp_path: Path) -> None:
    directory, gradient, update = _drift_capture(tmp_path)
    loaded = directory.load_round(3)
    assert loaded.updates[0].gradient_sha256 == update.gradient_sha256  # re-hashed from the stored .gradient.npz
    assert check_contribution(_record(update), loaded) == loaded.updates[0]
    for field in ("gradient_sha256", "drift_offset_sha256"):
        with pytest.raises(UpdateMismatchError) as err:
            check_contribution(_record(update, **{field: "ab" * 32}), loaded)
        assert err.value.reason is Reason.UPDATE_MISMATCH
        assert err.value.details["found"] == "ab" * 32
        assert err.value.details["expected"] == getattr(update, field)
    with pytest.raises(UpdateMismatchError):  # a body that leaves them out does not match either
        check_contribution(_record(update, gradient_sha256=None, drift_offset_sha256=None), loaded)
    tampered = {n: a + 1 for n, a in gradient.items()}
    with (tmp_path / "run" / "round-000003-node-11.gradient.npz").open("wb") as fh:
        np.savez(fh, **tampered)  # type: ignore[arg-type]
    with pytest.raises(UpdateMismatchError) as err:
        check_contribution(_record(update), directory.load_round(3))
    assert err.value.details["found"] == update.gradient_sha256


def test_a_plain_record_does_not_match_a_drift_corrected_capture_and_vice_versa(tmp_path: Path) -> None:
    _, _, update = _drift_capture(tmp_path)
    plain = dataclasses.replace(update, gradient=None, gradient_sha256=None, drift_offset_sha256=None)
    assert check_contribution(_record(plain), RoundCapture(5, 3, update.global_sha256, (plain,), ())) == plain
    with pytest.raises(UpdateMismatchError):
        check_contribution(_record(update), RoundCapture(5, 3, update.global_sha256, (plain,), ()))
