"""Valuation cost per round vs the number of members, and sampling accuracy vs exact Shapley, for the PLAID model.

Setup: task plaid-appliance@1 (protocol.tasks), validation = PLAID test split (537 windows, the buyer's set). Fifty
members train one real local epoch each on disjoint PLAID train partitions (10-11 recordings each); for n members,
member j sends base update j mod 50 plus independent noise (5 % of its norm), so up to n = 50 every member is a
distinct real update, and above that PLAID has too few recordings for disjoint partitions. Each n is valued with
the method ValuationSettings picks by default (exact <= 10, sampled <= 50, first-order above), screens included.

Baselines measured in the same run:
- time: one validation-loss evaluation of the model (every valuation time is also shown as a multiple of it);
- accuracy: exact Shapley at n = 10 (1,024 evaluations); sampling at smaller budgets is reported as Spearman rank
  correlation and max error relative to max |exact value|, and as a fraction of the exact evaluation count.

Run: .venv/bin/python bench/attribution_bench.py [--sizes 5,10,50,100,1000] [--seeds 3] [--threads 1]

torch runs single-threaded by default: on a shared machine, two intra-op threads under contention made one
evaluation 3-4x slower than one thread (measured 217-339 ms vs 49-67 ms at load average 8 on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from coordinator.attribution import (
    CoalitionGame,
    RoundUpdates,
    ValuationSettings,
    exact_shapley,
    first_order_values,
    sampled_shapley,
    screen_updates,
    value_round,
)
from coordinator.attribution.task_loss import TaskValidationLoss
from edge.sensors.plaid import load_plaid
from protocol.tasks.models import build_model, load_arrays, model_arrays, train_epochs
from protocol.tasks.spec import PLAID_APPLIANCE as SPEC

BASE_MEMBERS = 50


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def base_updates(val: TaskValidationLoss, global_flat: np.ndarray) -> np.ndarray:
    train = load_plaid("train", length=SPEC.window_length)
    x, y = train.X[:, None, :], train.y
    order = np.random.default_rng(0).permutation(len(y))
    rows = []
    for part in np.array_split(order, BASE_MEMBERS):
        model = build_model(SPEC, 0)
        load_arrays(model, val.unflatten(global_flat))
        train_epochs(SPEC, model, x[part], y[part], epochs=1, batch_size=16, lr=3e-3, seed=1)
        rows.append(val.flatten(model_arrays(model)) - global_flat)
    return np.stack(rows)


def members_updates(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = base[np.arange(n) % len(base)]
    noise = rng.standard_normal(picked.shape).astype(np.float32)
    scale = 0.05 * np.linalg.norm(picked, axis=1, keepdims=True) / np.sqrt(picked.shape[1])
    return (picked + scale * noise).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5,10,50,100,1000")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per budget in the accuracy table")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    test = load_plaid("test", length=SPEC.window_length)
    val = TaskValidationLoss(SPEC, build_model(SPEC, 0), test.X[:, None, :], test.y)
    global_flat = val.flatten(model_arrays(build_model(SPEC, 0)))
    base = base_updates(val, global_flat)
    settings = ValuationSettings()

    started = time.perf_counter()
    for _ in range(50):
        val(global_flat)
    eval_s = (time.perf_counter() - started) / 50
    print(
        f"model: {SPEC.key}, {val.size} parameters; validation windows: {len(test.y)}; torch threads: "
        f"{torch.get_num_threads()}"
    )
    print(f"baseline: one validation-loss evaluation = {eval_s * 1000:.2f} ms")
    print()
    print(
        f"{'n':>6} {'method':>12} {'evaluations':>12} {'seconds':>9} {'x baseline':>11} {'ms/member':>10} "
        f"{'screens s':>10}"
    )
    sampled_rounds = []
    for n in sizes:
        updates = members_updates(base, n, seed=n)
        round_updates = RoundUpdates(1, [f"m{i:04d}" for i in range(n)], global_flat, updates)
        started = time.perf_counter()
        valuation = value_round(round_updates, val, settings, gradient=val.gradient)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        screen_updates(updates, settings=settings.screens, global_params=global_flat)
        screens_s = time.perf_counter() - started
        print(
            f"{n:>6} {valuation.method.value:>12} {valuation.evaluations:>12} {seconds:>9.2f} "
            f"{seconds / eval_s:>11.0f} {1000 * seconds / n:>10.2f} {screens_s:>10.2f}"
        )
        if valuation.method.value == "sampled":
            sampled_rounds.append((n, updates, valuation))
    for n, updates, valuation in sampled_rounds:
        # No exact reference at this size: compare first-order with the sampled estimate, the method it replaces.
        weights = [1.0 / n] * n
        linear = first_order_values(val.gradient, global_flat, updates, weights)
        estimate = np.array([valuation.values[f"m{i:04d}"] for i in range(n)])
        errors = np.array([valuation.standard_errors[f"m{i:04d}"] for i in range(n)])
        print(
            f"n = {n}: first-order vs sampled estimate: spearman {spearman(estimate, linear):.3f}; "
            f"mean sampled standard error / mean |value| {float(np.mean(errors) / np.mean(np.abs(estimate))):.3f}"
        )

    print()
    print("accuracy at n = 10 against exact Shapley (baseline)")
    updates = members_updates(base, 10, seed=10)
    weights = [0.1] * 10
    exact_game = CoalitionGame(val, global_flat, updates, weights)
    started = time.perf_counter()
    exact = exact_shapley(exact_game)
    exact_s = time.perf_counter() - started
    header = ("method", "evaluations", "x exact evals", "spearman", "max err/max|v|", "seconds")
    print(f"{header[0]:>18} {header[1]:>12} {header[2]:>14} {header[3]:>9} {header[4]:>15} {header[5]:>8}")
    print(f"{'exact':>18} {exact_game.evaluations:>12} {1.0:>14.3f} {1.0:>9.3f} {0.0:>15.3f} {exact_s:>8.2f}")
    scale = float(np.max(np.abs(exact)))
    for budget in (64, 128, 256):
        rows = []
        for seed in range(args.seeds):
            game = CoalitionGame(val, global_flat, updates, weights)
            started = time.perf_counter()
            sampled = sampled_shapley(game, budget=budget, seed=seed)
            rows.append(
                (
                    sampled.evaluations,
                    spearman(exact, sampled.values),
                    float(np.max(np.abs(sampled.values - exact))) / scale,
                    time.perf_counter() - started,
                )
            )
        evals, rho, err, secs = (float(np.mean([r[i] for r in rows])) for i in range(4))
        worst = min(r[1] for r in rows)
        print(
            f"{f'sampled@{budget}':>18} {evals:>12.0f} {evals / exact_game.evaluations:>14.3f} {rho:>9.3f} "
            f"{err:>15.3f} {secs:>8.2f}   (worst spearman over {args.seeds} seeds {worst:.3f})"
        )
    started = time.perf_counter()
    linear = first_order_values(val.gradient, global_flat, updates, weights)
    linear_s = time.perf_counter() - started
    linear_err = float(np.max(np.abs(linear - exact))) / scale
    print(
        f"{'first_order':>18} {'1 grad':>12} {'':>14} {spearman(exact, linear):>9.3f} {linear_err:>15.3f} "
        f"{linear_s:>8.2f}"
    )
    order_exact = np.argsort(-exact)
    print(f"exact values (x1e3), best first: {np.round(exact[order_exact] * 1e3, 3).tolist()}")


if __name__ == "__main__":
    main()
