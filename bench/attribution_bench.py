"""Valuation cost per round vs the number of members, and sampling accuracy vs exact Shapley, for the PLAID model.

Setup: task plaid-appliance@1 (protocol.tasks), validation = PLAID test split (537 windows, the buyer's set). Fifty
members train one real local epoch each on disjoint PLAID train partitions (10-11 recordings each); for n <= 50,
member j sends base update j and independent noise (5 % of its norm). PLAID has too few recordings for more disjoint
partitions, so above 50 every member trains its own real epoch on its own random draw of `--recordings` train
recordings (with its own shuffle seed): n distinct members, as a real round of n devices has (two draws share about
recordings^2 / 537 recordings). The row "1000 (50 data)" is the old bench's round of 1,000 members: the 50 base
updates again and again plus 5 % noise, which the same-data grouping merges into at most 50 players (so that round is
valued by sampling, not first-order). Every round carries 8 earlier global models and the last global step (built
from the base updates), as the ServerApp's rounds do, so the data-free screen projects on the full history. Each n is
valued with the method ValuationSettings picks by default (exact <= 10, sampled <= 50, first-order above), screens
included.

Baselines measured in the same run:
- time: one validation-loss evaluation of the model (every valuation time is also shown as a multiple of it);
- code: with --baseline-rev REV, the same rounds valued by the attribution code of commit REV (exported with git
  archive and run in its own process, alternating with the current code `--repeats` times; medians shown, ratio
  = REV's seconds / current seconds);
- accuracy: exact Shapley at n = 10 (1,024 evaluations); sampling at smaller budgets is reported as Spearman rank
  correlation and max error relative to max |exact value|, and as a fraction of the exact evaluation count;
- sampling at 50 players (the 50-member round: the players a round over 50 members' data is grouped into): a long
  run without early stop (two seeds of --reference-evaluations / 2, averaged) is the reference; the sampler as
  ValuationSettings runs it, and the rule before (no early stop within 25 evaluations per player: the rule compared
  estimates 10 pairs apart from the 20th pair on, beyond that budget) on the same seeds, are compared with it.

Run: .venv/bin/python bench/attribution_bench.py [--sizes 5,10,50,100,1000,1000c] [--seeds 3] [--threads 1]
     [--baseline-rev 7755380] [--repeats 2] [--recordings 32] [--no-accuracy] [--reference-evaluations 4000]

torch runs single-threaded by default: on a shared machine, two intra-op threads under contention made one
evaluation 3-4x slower than one thread (measured 217-339 ms vs 49-67 ms at load average 8 on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from git_revision import export_revision

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
HISTORY = 8
REPO = Path(__file__).resolve().parent.parent


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def validation_loss() -> TaskValidationLoss:
    test = load_plaid("test", length=SPEC.window_length)
    return TaskValidationLoss(SPEC, build_model(SPEC, 0), test.X[:, None, :], test.y)


def trained_updates(
    val: TaskValidationLoss, global_flat: np.ndarray, parts: list[np.ndarray], seeds: list[int]
) -> np.ndarray:
    """One real local epoch from the global model per member, on the train recordings of its part."""
    train = load_plaid("train", length=SPEC.window_length)
    x, y = train.X[:, None, :], train.y
    start = val.unflatten(global_flat)
    model = build_model(SPEC, 0)
    out = np.empty((len(parts), global_flat.shape[0]), dtype=np.float32)
    for row, (part, seed) in enumerate(zip(parts, seeds, strict=True)):
        load_arrays(model, start)
        train_epochs(SPEC, model, x[part], y[part], epochs=1, batch_size=16, lr=3e-3, seed=seed)
        out[row] = val.flatten(model_arrays(model)) - global_flat
    return out


def base_updates(val: TaskValidationLoss, global_flat: np.ndarray) -> np.ndarray:
    count = len(load_plaid("train", length=SPEC.window_length).y)
    order = np.random.default_rng(0).permutation(count)
    return trained_updates(val, global_flat, list(np.array_split(order, BASE_MEMBERS)), [1] * BASE_MEMBERS)


def distinct_updates(val: TaskValidationLoss, global_flat: np.ndarray, n: int, recordings: int) -> np.ndarray:
    """n members, each its own random draw of `recordings` train recordings and its own shuffle seed."""
    count = len(load_plaid("train", length=SPEC.window_length).y)
    parts = [np.random.default_rng([n, j]).choice(count, recordings, replace=False) for j in range(n)]
    return trained_updates(val, global_flat, parts, [1000 + j for j in range(n)])


def members_updates(base: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picked = base[np.arange(n) % len(base)]
    noise = rng.standard_normal(picked.shape).astype(np.float32)
    scale = 0.05 * np.linalg.norm(picked, axis=1, keepdims=True) / np.sqrt(picked.shape[1])
    return (picked + scale * noise).astype(np.float32)


def history(base: np.ndarray, global_flat: np.ndarray) -> list[np.ndarray]:
    """HISTORY earlier global models, most recent first: each one global step (the mean of a random half of the base
    updates) before the next."""
    rng = np.random.default_rng(7)
    earlier, current = [], global_flat.astype(np.float32)
    for _ in range(HISTORY):
        step = base[rng.choice(len(base), len(base) // 2, replace=False)].mean(axis=0)
        current = (current - step).astype(np.float32)
        earlier.append(current)
    return earlier


def worker(inputs: Path, output: Path, threads: int) -> None:
    """Value one saved round with whatever coordinator.attribution PYTHONPATH gives (current code or a baseline)."""
    torch.set_num_threads(threads)
    data = np.load(inputs)
    val = validation_loss()
    global_flat, updates, earlier = data["global"], data["updates"], list(data["earlier"])
    n = updates.shape[0]
    round_updates = RoundUpdates(
        1,
        [f"m{i:04d}" for i in range(n)],
        global_flat,
        updates,
        previous_global_delta=global_flat - earlier[0],
        earlier_globals=earlier,
    )
    settings = ValuationSettings()
    started, cpu = time.perf_counter(), time.process_time()
    valuation = value_round(round_updates, val, settings, gradient=val.gradient)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    gradient = val.gradient(global_flat)
    started, cpu = time.perf_counter(), time.process_time()
    screen_updates(
        updates,
        settings=settings.screens,
        global_params=global_flat,
        previous_global_delta=global_flat - earlier[0],
        earlier_globals=earlier,
        validation_gradient=gradient,
    )
    screens_s, screens_cpu = time.perf_counter() - started, time.process_time() - cpu
    excluded = sum(1 for flags in valuation.flags.values() if any(f.excludes for f in flags))
    result = {
        "seconds": seconds,
        "screens": screens_s,
        "cpu": cpu_seconds,
        "screens_cpu": screens_cpu,
        "method": valuation.method.value,
        "evaluations": valuation.evaluations,
        "players": len(valuation.players),
        "excluded": excluded,
        "values": [valuation.values[f"m{i:04d}"] for i in range(n)],
        "pairs": len(valuation.similarities),  # what the round's ROUND leaf lists under same_data
    }
    output.write_text(json.dumps(result))


def run_worker(inputs: Path, code_root: Path, threads: int) -> dict[str, object]:
    output = inputs.with_suffix(f".{code_root.name}.json")
    env = dict(os.environ, PYTHONPATH=str(code_root))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(inputs), str(output)]
    subprocess.run([*command, "--threads", str(threads)], check=True, env=env, cwd=code_root)
    result: dict[str, object] = json.loads(output.read_text())
    return result


def median(values: list[float]) -> float:
    return float(np.median(values))


def cost_table(args: argparse.Namespace, val: TaskValidationLoss, global_flat: np.ndarray, base: np.ndarray) -> None:
    earlier = history(base, global_flat)
    with tempfile.TemporaryDirectory(prefix="attribution-bench-") as scratch:
        roots = [REPO]
        if args.baseline_rev:
            roots.append(export_revision(args.baseline_rev, Path(scratch), "coordinator", "protocol", "edge"))
        columns = f"{'n':>14} {'players':>8} {'excluded':>8} {'method':>12} {'evals':>6} {'x eval':>7}"
        columns += f" {'round s':>8} {'CPU s':>6} {'screens s':>9} {'CPU s':>6}"
        if args.baseline_rev:
            columns += f" | {'base s':>7} {'CPU s':>6} {'screens s':>9} {'CPU s':>6} | {'ratio':>5} {'CPU':>5}"
            columns += f" {'screens':>7} {'CPU':>5}"
        print(columns)
        for size in args.sizes.split(","):
            copies = size.endswith("c")
            n = int(size.rstrip("c"))
            if copies or n <= BASE_MEMBERS:
                updates, label = members_updates(base, n, seed=n), f"{n} (50 data)" if copies else str(n)
            else:
                started = time.perf_counter()
                updates, label = distinct_updates(val, global_flat, n, args.recordings), str(n)
                print(f"  ({n} distinct members trained in {time.perf_counter() - started:.1f} s)", flush=True)
            inputs = Path(scratch) / f"round-{size}.npz"
            np.savez(inputs, updates=updates, earlier=np.stack(earlier), **{"global": global_flat})
            runs: dict[Path, list[dict[str, object]]] = {root: [] for root in roots}
            for _ in range(args.repeats):
                for root in roots:
                    runs[root].append(run_worker(inputs, root, args.threads))
            current = timings(runs[REPO])
            first = runs[REPO][0]
            line = (
                f"{label:>14} {first['players']:>8} {first['excluded']:>8} {first['method']:>12} "
                f"{first['evaluations']:>6} {current[0] / args.eval_s:>7.0f}"
                + "".join(f" {t:>{w}.2f}" for t, w in zip(current, (8, 6, 9, 6), strict=True))
            )
            if args.baseline_rev:
                old = timings(runs[roots[1]])
                line += " |" + "".join(f" {t:>{w}.2f}" for t, w in zip(old, (7, 6, 9, 6), strict=True)) + " |"
                line += "".join(f" {o / c:>{w}.1f}" for o, c, w in zip(old, current, (5, 5, 7, 5), strict=True))
                base_first = runs[roots[1]][0]
                same = all(base_first[key] == first[key] for key in ("players", "excluded", "method"))
                gap = float(np.max(np.abs(np.array(base_first["values"]) - np.array(first["values"]))))
                line += f"   same players/method: {same}, max |value difference| {gap:.1e}"
                line += f"; same-data pairs logged {first.get('pairs')} (base {base_first.get('pairs', '-')})"
            else:
                line += f"   same-data pairs logged {first.get('pairs')}"
            print(line, flush=True)


def timings(runs: list[dict[str, object]]) -> list[float]:
    """Medians over the runs of: round seconds, round CPU seconds, screens seconds, screens CPU seconds."""
    return [median([float(str(r[key])) for r in runs]) for key in ("seconds", "cpu", "screens", "screens_cpu")]


def accuracy_table(
    args: argparse.Namespace, val: TaskValidationLoss, global_flat: np.ndarray, base: np.ndarray
) -> None:
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


class RememberedLoss:
    """The validation loss, each parameter vector evaluated once: runs of one seed share their coalitions (the
    sampler with early stop evaluates a prefix of what the run without it evaluates), so comparing them costs one."""

    def __init__(self, val: TaskValidationLoss) -> None:
        self._val = val
        self._known: dict[bytes, float] = {}

    def __call__(self, flat: np.ndarray) -> float:
        key = flat.tobytes()
        if key not in self._known:
            self._known[key] = self._val(flat)
        return self._known[key]


def sampling_at_50_table(
    args: argparse.Namespace, val: TaskValidationLoss, global_flat: np.ndarray, base: np.ndarray
) -> None:
    print()
    print(f"sampling at {BASE_MEMBERS} players against a long run without early stop (reference)")
    updates = members_updates(base, BASE_MEMBERS, seed=BASE_MEMBERS)
    weights = [1.0 / BASE_MEMBERS] * BASE_MEMBERS
    settings = ValuationSettings()
    halves = []
    for seed in (10_001, 10_002):
        game = CoalitionGame(val, global_flat, updates, weights)
        halves.append(
            sampled_shapley(game, budget=args.reference_evaluations // 2, seed=seed, convergence_tolerance=0.0)
        )
    reference = (halves[0].values + halves[1].values) / 2
    scale = float(np.max(np.abs(reference)))
    print(
        f"reference: {sum(h.evaluations for h in halves)} evaluations, {sum(h.pairs for h in halves)} pairs; "
        f"its two halves agree at Spearman {spearman(halves[0].values, halves[1].values):.4f}, max difference "
        f"{float(np.max(np.abs(halves[0].values - halves[1].values))) / scale:.4f} of max |value|"
    )
    header = ("sampler", "seed", "evaluations", "pairs", "spearman", "max err/max|v|")
    print(f"{header[0]:>24} {header[1]:>5} {header[2]:>12} {header[3]:>6} {header[4]:>9} {header[5]:>15}")
    budget = settings.evaluations_per_player * BASE_MEMBERS
    for seed in range(args.seeds):
        loss = RememberedLoss(val)
        for name, tolerance in (("before: no early stop", 0.0), ("now: early stop", settings.convergence_tolerance)):
            game = CoalitionGame(loss, global_flat, updates, weights)
            sampled = sampled_shapley(game, budget=budget, seed=seed, convergence_tolerance=tolerance)
            error = float(np.max(np.abs(sampled.values - reference))) / scale
            print(
                f"{name:>24} {seed:>5} {sampled.evaluations:>12} {sampled.pairs:>6} "
                f"{spearman(reference, sampled.values):>9.4f} {error:>15.4f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="5,10,50,100,1000,1000c", help="member counts; 'c': copies of 50 data")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seeds per budget in the accuracy table")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--baseline-rev", default="", help="also value every round with this commit's code")
    parser.add_argument("--repeats", type=int, default=1, help="runs per round and code, alternating; medians")
    parser.add_argument("--recordings", type=int, default=32, help="train recordings per member above 50 members")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy tables")
    parser.add_argument(
        "--reference-evaluations", type=int, default=4000, help="evaluations of the reference run at 50 players"
    )
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.threads)
        return
    torch.set_num_threads(args.threads)

    val = validation_loss()
    global_flat = val.flatten(model_arrays(build_model(SPEC, 0)))
    base = base_updates(val, global_flat)
    started = time.perf_counter()
    for _ in range(50):
        val(global_flat)
    args.eval_s = (time.perf_counter() - started) / 50
    print(f"model: {SPEC.key}, {val.size} parameters; torch threads: {torch.get_num_threads()}")
    print(f"baseline: one validation-loss evaluation = {args.eval_s * 1000:.2f} ms")
    if args.baseline_rev:
        print(f"baseline code: {args.baseline_rev}; {args.repeats} run(s) per round and code, alternating")
    print()
    cost_table(args, val, global_flat, base)
    if not args.no_accuracy:
        accuracy_table(args, val, global_flat, base)
        sampling_at_50_table(args, val, global_flat, base)


if __name__ == "__main__":
    main()
