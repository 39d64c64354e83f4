"""The bench's Adam state across calls and its per-call lr warmup (bench/optimizer_state.py, the levers
`bench/fl_bench.py simulate --optimizer-state` and `--warmup-steps` measure), against production's `train_epochs`,
with the real PLAID model on synthetic windows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from protocol.tasks import get_task
from protocol.tasks.models import build_model, load_arrays, model_arrays, train_epochs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not an installed package

from optimizer_state import train_epochs_with_state

SPEC = get_task("plaid-appliance", 1)


def _windows(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(SPEC.labels), n)
    t = np.linspace(0, 1, SPEC.window_length, dtype=np.float32)
    x = np.sin(2 * np.pi * (y[:, None] + 1) * t)[:, None, :] * (1 + y[:, None, None])
    return x.astype(np.float32), y.astype(np.int64)


def _flat(model: object) -> np.ndarray:
    return np.concatenate([a.ravel() for a in model_arrays(model).values()])  # type: ignore[arg-type]


def test_kept_state_continues_one_adam_and_fresh_state_restarts_it() -> None:
    # Full-batch steps, so the shuffle order cannot matter: two one-epoch calls that carry the state must land where
    # one two-epoch call does; the second call with a fresh Adam must not.
    x, y = _windows()
    whole = build_model(SPEC)
    train_epochs(SPEC, whole, x, y, epochs=2, batch_size=len(x), lr=0.01, seed=0)

    def two_calls(carry: bool) -> np.ndarray:
        model = build_model(SPEC)
        state = train_epochs_with_state(SPEC, model, x, y, epochs=1, batch_size=len(x), lr=0.01, seed=0)
        restarted = build_model(SPEC)  # a device rebuilds its model every round
        load_arrays(restarted, model_arrays(model))
        train_epochs_with_state(
            SPEC, restarted, x, y, epochs=1, batch_size=len(x), lr=0.01, seed=1, adam_state=state if carry else None
        )
        return _flat(restarted)

    np.testing.assert_allclose(two_calls(carry=True), _flat(whole), rtol=0, atol=1e-6)
    assert np.abs(two_calls(carry=False) - _flat(whole)).max() > 1e-4


def test_kept_state_trains_at_the_given_lr_not_the_saved_one() -> None:
    x, y = _windows()
    model = build_model(SPEC)
    state = train_epochs_with_state(SPEC, model, x, y, epochs=1, batch_size=len(x), lr=0.01, seed=0)
    start = model_arrays(model)
    moved = {}
    for lr in (0.01, 0.0):
        again = build_model(SPEC)
        load_arrays(again, start)
        after = train_epochs_with_state(SPEC, again, x, y, epochs=1, batch_size=len(x), lr=lr, seed=0, adam_state=state)
        moved[lr] = np.abs(_flat(again) - np.concatenate([a.ravel() for a in start.values()])).max()
        assert after["param_groups"][0]["lr"] == lr  # type: ignore[index]
    assert moved[0.0] == 0.0 < moved[0.01]


@pytest.mark.parametrize("warmup", [2, 5])
def test_warmup_makes_the_first_step_lr_over_warmup(warmup: int) -> None:
    x, y = _windows()
    ramped, scaled = build_model(SPEC), build_model(SPEC)
    train_epochs_with_state(SPEC, ramped, x, y, epochs=1, batch_size=len(x), lr=0.01, seed=0, warmup_steps=warmup)
    train_epochs(SPEC, scaled, x, y, epochs=1, batch_size=len(x), lr=0.01 / warmup, seed=0)
    np.testing.assert_array_equal(_flat(ramped), _flat(scaled))


def test_without_a_state_or_warmup_it_trains_exactly_as_production() -> None:
    x, y = _windows()
    ours, production = build_model(SPEC), build_model(SPEC)
    train_epochs_with_state(SPEC, ours, x, y, epochs=2, batch_size=4, lr=0.01, seed=3)
    train_epochs(SPEC, production, x, y, epochs=2, batch_size=4, lr=0.01, seed=3)
    np.testing.assert_array_equal(_flat(ours), _flat(production))
