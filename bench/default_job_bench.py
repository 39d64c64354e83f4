"""What a job started with only a task and devices is worth: its model's accuracy against central training.

Setup (as bench/job_overhead_bench.py, tests/fl_stack.py): Mosquitto, `midgate coordinator serve` with its
SuperLink, D enrolled `midgate agent run` daemons each replaying its share of PLAID's training recordings (split by
label), all on this machine. Then `midgate coordinator job start` with only the task, the buyer's validation windows
(PLAID's test split), purpose and buyer: the task's recipe (60 rounds for plaid-appliance@1), every round valued and
aggregated as the valuation says, as an operator's default job is.

Baseline, in the same run: central training of the same model on the union of the devices' windows (PLAID's whole
training split), the best over every lr schedule and the 40- and 60-epoch budgets, with and without the mean of the
last 10 epochs' models (bench/fl_bench.py's central_accuracies, the baseline of BENCHMARKS.md's accuracy tables).
Printed: the job's final accuracy, the best central, the gap in points (target: at most 3), and the job's time.

Run: flock /tmp/bench.lock .venv/bin/python bench/default_job_bench.py [--devices 5] [--seed 0]
     (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fl_bench import central_accuracies
from flower_fixtures import plaid_windows
from job_overhead_bench import job_on_real_processes

from protocol.tasks.spec import get_task

JOB = "bench-default"


def central_baseline(seed: int) -> dict[str, float]:
    """Central accuracies under the recipe's budget and settings (batch, lr, tail), as bench/fl_bench.py trains them."""
    recipe = get_task("plaid-appliance", 1).recipe
    args = argparse.Namespace(
        rounds=recipe.rounds,
        local_epochs=recipe.local_epochs,
        round_fraction=1.0,
        central_budgets=[40, 60],
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        seed=seed,
        optimizer_state="fresh",
        warmup_steps=0,
        tail_average=recipe.tail_average,
        tail_ema=0.0,
    )
    return central_accuracies(args, plaid_windows("train"), plaid_windows("test"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the central model's initialisation seed")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it: every process's log")
    args = parser.parse_args()
    total, outcome = job_on_real_processes(args.devices, None, JOB, args.keep)
    federated = outcome.final_validation["accuracy"]
    central = central_baseline(args.seed)
    best = max(central, key=central.__getitem__)
    print(
        json.dumps(
            {
                "devices": args.devices,
                "rounds": len(outcome.round_seconds),
                "job_s": round(total, 1),
                "federated_accuracy": round(federated, 4),
                "central_best": best,
                "central_best_accuracy": round(central[best], 4),
                "gap_points": round(100 * (central[best] - federated), 2),
                "central": {name: round(acc, 4) for name, acc in sorted(central.items())},
            }
        )
    )


if __name__ == "__main__":
    main()
