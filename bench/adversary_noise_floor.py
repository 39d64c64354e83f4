"""The noise under bench/adversary_bench.py's same-data ratios: how far one more honest member moves the pay of the
member an adversary copies, against how far the 70 % node moves it.

A same-data ratio is (the copied member's pay + its copy's) / (the member's pay in the job without the copy): two
jobs whose models part ways from round 2. If any extra member moved a member's pay by tens of per cent, a ratio of
1.38 could be that noise; this bench measures it. Per seed, three jobs on PLAID with the same honest members
(bench/planted_adversaries.py): the clean job (the baseline), the same members with one more honest member holding
recordings no one else holds (the placebo), and the same members with the 70 % node. It prints the copied member's
(m000) pay in each over its pay in the clean job, and the 10th, 50th and 90th percentile of that ratio over every
honest member in the placebo job.

Run: cd bench && nice -n 10 ../.venv/bin/python adversary_noise_floor.py [--members 50] [--recordings 10]
     [--seeds 0,1,2] [--rounds 4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from planted_adversaries import ADVERSARIES, ADVERSARY, VICTIM, Job, PlaidWorld, attack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=50)
    parser.add_argument("--recordings", type=int, default=10, help="PLAID training recordings per member")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    world = PlaidWorld()
    n = args.members
    print(f"PLAID, {n} members of {args.recordings} recordings, {args.rounds} rounds; pay over the clean job's")
    print(
        "| seed | m000 with one more honest member | its pay over m000's | all members: p10 / p50 / p90 |"
        " m000 with the 70 % node | the node | pair | seconds |"
    )
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for seed in (int(s) for s in args.seeds.split(",")):
        started = time.monotonic()
        data = world.member_data([args.recordings] * (n + 1), seed)  # the first n are the clean job's members
        clean = Job(world, data[:n], args.rounds, seed).run()
        placebo = Job(world, data, args.rounds, seed).run()
        copied = attack(world, ADVERSARIES["70 % of the data"], data[:n], args.rounds, seed)
        alone = clean.pay[VICTIM]
        moved = np.array([placebo.pay.get(f"m{i:03d}", 0) / max(clean.pay.get(f"m{i:03d}", 0), 1) for i in range(n)])
        p10, p50, p90 = np.percentile(moved, [10, 50, 90])
        print(
            f"| {seed} | {placebo.pay[VICTIM] / alone:.3f}x | {placebo.pay[f'm{n:03d}'] / alone:.3f}x |"
            f" {p10:.3f} / {p50:.3f} / {p90:.3f} | {copied.attacked.pay.get(VICTIM, 0) / alone:.3f}x |"
            f" {copied.attacked.pay.get(ADVERSARY, 0) / alone:.3f}x | **{copied.group_ratio:.3f}x** |"
            f" {time.monotonic() - started:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
