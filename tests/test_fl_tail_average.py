"""The job's final model as the mean of the last K rounds' global models (run-config `tail-average`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from pydantic import ValidationError

from coordinator.federation.job import JobRunConfig
from coordinator.federation.server_app import ValidationEvaluator, tail_average
from protocol.tasks.models import build_model, model_arrays
from protocol.tasks.spec import get_task
from protocol.tasks.windows import WindowSet, window_fingerprint

SPEC = get_task("plaid-appliance", 1)


def _validation(seed: int = 0) -> WindowSet:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(24, SPEC.channels, SPEC.window_length)).astype(np.float32)
    y = rng.integers(0, len(SPEC.labels), size=24)
    return WindowSet(x, y, window_fingerprint(x, y))


def test_the_tail_average_is_the_element_wise_mean_in_each_arrays_dtype() -> None:
    models = [
        {"w": np.full((2, 3), v, dtype=np.float32), "b": np.array([v, 2 * v], dtype=np.float32)} for v in (1, 2, 6)
    ]
    mean = tail_average(models)
    assert mean["w"].dtype == np.float32 and np.array_equal(mean["w"], np.full((2, 3), 3.0, dtype=np.float32))
    assert np.array_equal(mean["b"], np.array([3.0, 6.0], dtype=np.float32))
    with pytest.raises(ValueError, match="no global model"):
        tail_average([])


def test_the_evaluator_keeps_the_last_k_rounds_models_and_scores_their_mean() -> None:
    evaluator = ValidationEvaluator(SPEC, _validation(), tail=2)
    rounds = [model_arrays(build_model(SPEC, seed=s)) for s in range(4)]
    for server_round, arrays in enumerate(rounds):  # round 0 is the initial model: never in the tail
        evaluator(server_round, ArrayRecord({n: Array(a) for n, a in arrays.items()}))
    assert len(evaluator.tail) == 2
    kept = list(evaluator.tail)
    for name in rounds[0]:
        assert np.array_equal(kept[0][name], rounds[2][name]) and np.array_equal(kept[1][name], rounds[3][name])
    mean = tail_average(kept)
    expected = {n: ((rounds[2][n].astype(np.float64) + rounds[3][n]) / 2).astype(np.float32) for n in rounds[0]}
    assert all(np.array_equal(mean[n], expected[n]) for n in expected)
    # Its score is the mean model's own, not one of the rounds'.
    assert evaluator.score(mean)["loss"] not in {evaluator.history[r]["loss"] for r in (2, 3)}
    assert set(evaluator.history) == {0, 1, 2, 3}


def test_the_evaluator_shows_every_global_model_it_scores_to_its_observer() -> None:
    """Attribution values a round's updates as deltas from the model that round was sent: the initial model, then
    each round's aggregate, exactly the models Flower hands its evaluate_fn."""
    seen: list[dict[str, np.ndarray]] = []
    evaluator = ValidationEvaluator(SPEC, _validation(), observe=lambda model: seen.append(dict(model)))
    rounds = [model_arrays(build_model(SPEC, seed=s)) for s in range(3)]
    for server_round, arrays in enumerate(rounds):
        evaluator(server_round, ArrayRecord({n: Array(a) for n, a in arrays.items()}))
    assert len(seen) == 3
    assert all(np.array_equal(seen[r][n], rounds[r][n]) for r in range(3) for n in rounds[r])


def test_tail_average_is_a_run_config_key_of_at_least_one(tmp_path: Path) -> None:
    base: dict[str, object] = {
        "task-id": "plaid-appliance",
        "task-version": 1,
        "selected-nodes": "1 2",
        "validation-path": str(tmp_path / "v.npz"),
        "output-dir": str(tmp_path),
    }
    assert JobRunConfig.from_run_config(base).tail_average == 1
    assert JobRunConfig.from_run_config(base | {"tail-average": 10}).tail_average == 10
    with pytest.raises(ValidationError):
        JobRunConfig.from_run_config(base | {"tail-average": 0})
