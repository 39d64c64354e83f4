"""protocol.tasks.models: deterministic models, strict weight loading, and each task actually learning."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from protocol.errors import MalformedError
from protocol.tasks import REGISTRY, TaskKind, arrays_sha256
from protocol.tasks.models import (
    PlainAdam,
    build_model,
    evaluate,
    load_arrays,
    minibatches,
    model_arrays,
    to_tensors,
    train_epochs,
    train_step,
)
from protocol.tasks.spec import TaskSpec


def _data(spec: TaskSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Learnable synthetic windows per kind (the PLAID accuracy itself is measured in the Flower tests/bench)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, spec.window_length, dtype=np.float32)
    if spec.kind is TaskKind.CLASSIFICATION:
        y = rng.integers(0, len(spec.labels), n)
        x = np.sin(2 * np.pi * (y[:, None] + 1) * t)[:, None, :] * (1 + y[:, None, None])
        return (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32), y.astype(np.int64)
    phase = rng.uniform(0, 2 * np.pi, (n, spec.channels, 1))
    full = np.sin(2 * np.pi * 3 * np.linspace(0, 1.1, spec.window_length + 1)[None, None, :] + phase)
    x = full[:, :, :-1].astype(np.float32)
    if spec.kind is TaskKind.FORECAST:
        return x, full[:, :, -1].astype(np.float32)
    return x, None


@pytest.mark.parametrize("key", sorted(REGISTRY), ids=lambda k: f"{k[0]}@{k[1]}")
def test_models_are_deterministic_and_learn(key: tuple[str, int]) -> None:
    spec = REGISTRY[key]
    assert arrays_sha256(model_arrays(build_model(spec, seed=3))) == arrays_sha256(
        model_arrays(build_model(spec, seed=3))
    )
    assert arrays_sha256(model_arrays(build_model(spec, seed=3))) != arrays_sha256(
        model_arrays(build_model(spec, seed=4))
    )
    x, y = _data(spec, 256, seed=0)
    model = build_model(spec)
    before = evaluate(spec, model, x, y)["loss"]
    train_epochs(spec, model, x, y, epochs=15, batch_size=32, lr=0.01, seed=0)
    after = evaluate(spec, model, x, y)["loss"]
    assert after < 0.5 * before


def test_load_arrays_refuses_wrong_names_and_shapes() -> None:
    spec = REGISTRY[("plaid-appliance", 1)]
    model = build_model(spec)
    arrays = model_arrays(model)
    name = next(iter(arrays))
    with pytest.raises(MalformedError):
        load_arrays(model, {k: v for k, v in arrays.items() if k != name})
    with pytest.raises(MalformedError):
        load_arrays(model, {**arrays, name: np.zeros((1,), dtype=np.float32)})
    load_arrays(model, arrays)
    assert arrays_sha256(model_arrays(model)) == arrays_sha256(arrays)


def test_training_refuses_windows_of_the_wrong_shape_or_labels() -> None:
    spec = REGISTRY[("plaid-appliance", 1)]
    model = build_model(spec)
    with pytest.raises(MalformedError):
        train_epochs(
            spec,
            model,
            np.zeros((4, 2, 128), np.float32),
            np.zeros(4, np.int64),
            epochs=1,
            batch_size=2,
            lr=0.1,
            seed=0,
        )
    with pytest.raises(MalformedError):
        train_epochs(
            spec, model, np.zeros((4, 1, 128), np.float32), np.full(4, 11), epochs=1, batch_size=2, lr=0.1, seed=0
        )


@pytest.mark.parametrize("key", sorted(REGISTRY), ids=lambda k: f"{k[0]}@{k[1]}")
def test_plain_adam_trains_bit_for_bit_as_torch_adam(key: tuple[str, int]) -> None:
    spec = REGISTRY[key]
    x, y = _data(spec, 64, seed=1)
    xt, yt = to_tensors(spec, x, y)
    trained = []
    for make in (lambda m: PlainAdam(m.parameters(), lr=0.01), lambda m: torch.optim.Adam(m.parameters(), lr=0.01)):
        model = build_model(spec, seed=2)
        optimiser = make(model)
        for batch in minibatches(len(xt), 2, 16, seed=5):
            train_step(spec, model, optimiser, xt[batch], yt[batch])
        trained.append(arrays_sha256(model_arrays(model)))
    assert trained[0] == trained[1]


def test_training_imports_no_compiler() -> None:
    """train_epochs in a fresh process leaves torch._dynamo and sympy unimported (PlainAdam's reason to exist)."""
    program = (
        "import sys, numpy as np\n"
        "from protocol.tasks import REGISTRY\n"
        "from protocol.tasks.models import build_model, train_epochs\n"
        "spec = REGISTRY[('plaid-appliance', 1)]\n"
        "x = np.random.default_rng(0).standard_normal((8, spec.channels, spec.window_length)).astype(np.float32)\n"
        "train_epochs(spec, build_model(spec), x, np.zeros(8, np.int64), epochs=1, batch_size=4, lr=0.01, seed=0)\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
