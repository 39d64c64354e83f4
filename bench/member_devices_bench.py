"""What an honest member with two devices is paid, one member's devices being one player (docs/attribution.md,
section 3), against the same data on one device and against each device being a player of its own (before).

Two members of the kind a MID has, in the jobs of bench/planted_adversaries.py (screens, valuation, aggregation
with the valuation's weights, settlement under the MID's default policy), same honest members and seeds:
- spread: member m000's examples split in two halves over two devices (the baseline: all of them on one device);
- double: m000 holds twice the others' examples, different ones, over two devices (the baseline: all of them on
  one device).
Each row prints m000's pay with its two devices as one player and as two players, over its pay with the data on
one device (mean / min / max over the seeds), and what the other members' pay moves by (mean / max of their
losses, negative: they gain). Two more rows measure what one device alone gets by sending its own update scaled
(boosted x1.5, x2): what a member's devices together may not exceed, and an open limit of its own (issue 17).

Run: flock /tmp/bench.lock nice -n 19 .venv/bin/python bench/member_devices_bench.py [--worlds synthetic,plaid]
     [--members 5,10] [--seeds 0,1,2,100,101,102]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
from planted_adversaries import Data, Job, PlaidWorld, SyntheticWorld, World

MEMBER = "m000"
EXAMPLES = {"synthetic": 8, "plaid": 30}


def _halves(data: Data) -> tuple[Data, Data]:
    x, y = data
    return (x[0::2], y[0::2]), (x[1::2], y[1::2])


def _pays(world: World, data: list[Data], rounds: int, seed: int) -> tuple[float, float, float, float, float]:
    """m000's pay with its data on one device, on two devices as one player and as two; the other members' pay
    lost with two devices as one player and as two (shares of their pay on one device)."""
    second = f"m{len(data):03d}"
    first_half, second_half = _halves(data[0])
    on_one = Job(world, data, rounds, seed).run().pay
    spread = [first_half, *data[1:], second_half]
    as_one = Job(world, spread, rounds, seed, owners={second: MEMBER}).run().pay
    as_two = Job(world, spread, rounds, seed).run().pay
    others = [f"m{i:03d}" for i in range(1, len(data))]

    def lost(pay: dict[str, int]) -> float:
        before = sum(on_one.get(n, 0) for n in others)
        return 1.0 - sum(pay.get(n, 0) for n in others) / before if before else float("nan")

    member_one = as_one.get(MEMBER, 0) + as_one.get(second, 0)
    member_two = as_two.get(MEMBER, 0) + as_two.get(second, 0)
    return on_one.get(MEMBER, 0), member_one, member_two, lost(as_one), lost(as_two)


class _Boosted:
    """`world` with the device holding `target` sending its own update times `factor`."""

    def __init__(self, world: World, target: Data, factor: float) -> None:
        self.world, self.target, self.factor = world, target, factor

    def __getattr__(self, name: str) -> object:
        return getattr(self.world, name)

    def train(self, params: np.ndarray, data: Data, seed: int) -> np.ndarray:
        update = self.world.train(params, data, seed)
        return (self.factor * update).astype(np.float32) if data[0] is self.target[0] else update


def _boosted(world: World, data: list[Data], rounds: int, seed: int, factor: float) -> tuple[float, float]:
    """m000's pay with its update boosted over its pay honest, and the others' loss."""
    honest = Job(world, data, rounds, seed).run().pay
    boosted = Job(_Boosted(world, data[0], factor), data, rounds, seed).run().pay  # type: ignore[arg-type]
    others = [f"m{i:03d}" for i in range(1, len(data))]
    before = sum(honest.get(n, 0) for n in others)
    return boosted.get(MEMBER, 0) / honest[MEMBER], 1.0 - sum(boosted.get(n, 0) for n in others) / before


def _cell(values: Sequence[float]) -> str:
    return f"{np.mean(values):.2f} / {min(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="synthetic,plaid")
    parser.add_argument("--members", default="5,10")
    parser.add_argument("--seeds", default="0,1,2,100,101,102")
    parser.add_argument("--synthetic-rounds", type=int, default=6)
    parser.add_argument("--plaid-rounds", type=int, default=4)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| world | members | m000's data | as one player | as two players | others lose: one / two (%) |")
    print("|---|---:|---|---|---|---|")
    for name in args.worlds.split(","):
        plaid = PlaidWorld() if name == "plaid" else None
        rounds = args.plaid_rounds if name == "plaid" else args.synthetic_rounds
        for m in (int(x) for x in args.members.split(",")):
            for scenario in ("spread", "double"):
                started = time.perf_counter()
                one, two, lost_one, lost_two = [], [], [], []
                for seed in seeds:
                    world: World = plaid or SyntheticWorld(classes=max(20, 2 * m), classes_per_member=2, seed=seed)
                    count = EXAMPLES[name]
                    counts = [2 * count if scenario == "double" else count] + [count] * (m - 1)
                    base, as_one, as_two, others_one, others_two = _pays(
                        world, world.member_data(counts, seed), rounds, seed
                    )
                    one.append(as_one / base)
                    two.append(as_two / base)
                    lost_one.append(100 * others_one)
                    lost_two.append(100 * others_two)
                print(
                    f"| {name} | {m} | {scenario} | {_cell(one)} | {_cell(two)} | {np.mean(lost_one):.2f} /"
                    f" {np.mean(lost_two):.2f} | ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            for factor in (1.5, 2.0):
                started = time.perf_counter()
                ratios, lost = [], []
                for seed in seeds:
                    world = plaid or SyntheticWorld(classes=max(20, 2 * m), classes_per_member=2, seed=seed)
                    ratio, others = _boosted(world, world.member_data([EXAMPLES[name]] * m, seed), rounds, seed, factor)
                    ratios.append(ratio)
                    lost.append(100 * others)
                print(
                    f"| {name} | {m} | one device, its update x{factor} | {_cell(ratios)} | | {np.mean(lost):.2f} |"
                    f" ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
    print("\ncells: m000's pay over its pay with all of its data on one device, mean / min / max over the seeds")
    print(f"{seeds}; others lose: the mean share of their pay the other members lose (negative: they gain).")


if __name__ == "__main__":
    main()
