"""Planted adversaries of issue 17: the share of the member pool each kind earns and the pay honest members lose.

Every job runs the ServerApp's attribution path (bench/planted_adversaries.py: screens, valuation, aggregation with
the valuation's weights, settlement under the MID's default policy) twice with the same honest members and seeds:
once alone ("clean") and once with one adversary. Worlds:
- synthetic: softmax regression on Gaussian classes, members drawing examples from 2 classes each, no two members
  sharing a class (near-orthogonal honest updates), 20 classes (100 at 50 members), few examples per member;
- PLAID: the appliance model as devices train it, disjoint partitions of the PLAID train split, PLAID test as the
  buyer's validation set.
Per adversary kind:
- data-free (scaled, shrunk, noised, stale, mixed copies of global models): its share of the member pool;
- same data (re-seeded training of a member's data, 70 % of it): the pair's pay over what the member alone earns;
- copycat (half of a member's update, with noise): the share of its pay the member loses, and the copy's share;
- every kind: the share of their pay the honest members lose together (a second table).
Same-data cells are settled three ways: with the job's same-data groups (coordinator.attribution.history), with the
per-round groups alone (the baseline, the same jobs), and keeping the larger value of a linked pair's two players (the
settlement rule before the smaller; copycat cells too); each world also prints the honest pairs paid as one member
(both ways) and the largest share of its pay an honest member lost to the job-level grouping (under both rules).
Adversaries marked * are adaptive attacks beyond issue 17's list: their results are published, they are not
targets. Honest false exclusions count every honest member-round a screen excluded, clean and attacked jobs alike.
With --aggregation, the same jobs run on Flower's robust strategies (accuracy and attribution per strategy). With
--victims-device, the adversary is a second device of the member it copies (docs/attribution.md, section 3: one
member's devices are one player); by default it is a member of its own. A data-free cell then holds what the member
gains by the device (share of the member pool, may be negative), the honest pay lost is the other members'.

Run: flock /tmp/bench.lock nice -n 19 .venv/bin/python bench/adversary_bench.py [--worlds synthetic,plaid]
     [--members 5,10,50] [--seeds 0,1,2] [--holdout 100,101,102] [--aggregation fedavg,fedmedian,...] [--quick]
     [--victims-device]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from planted_adversaries import (
    ADVERSARIES,
    Adversary,
    AttackOutcome,
    Job,
    JobResult,
    PlaidWorld,
    SyntheticWorld,
    World,
    attack,
    honest_exclusion_reasons,
    honest_exclusions,
    honest_grouping,
)

PLAID_EXAMPLES = {5: 30, 10: 30, 50: 10}
SYNTHETIC_EXAMPLES = 8
TARGET_SHARE = 0.005
TARGET_GROUP = 1.1
TARGET_COPY_LOSS = 0.10
TARGET_EXCLUSIONS = 0.01


@dataclass
class Cell:
    """Every outcome of one adversary at one member count in one world, over seeds."""

    outcomes: list[AttackOutcome]

    def shares(self) -> list[float]:
        return [o.adversary_share for o in self.outcomes]

    def summary(self) -> str:
        kind = self.outcomes[0].adversary.kind
        shares = self.shares()
        if kind == "data-free":
            return f"{100 * np.mean(shares):.2f} / {100 * max(shares):.2f}"
        if kind == "same-data":
            groups = [o.group_ratio for o in self.outcomes]
            baseline = [o.group_ratio_round_groups_only for o in self.outcomes]
            larger = [o.group_ratio_larger_kept for o in self.outcomes]
            before = f"{np.mean(baseline):.2f} / {max(baseline):.2f}x"
            return (
                f"{np.mean(groups):.2f} / {max(groups):.2f}x (round groups: {before}; larger value:"
                f" {np.mean(larger):.2f} / {max(larger):.2f}x)"
            )
        losses = [o.victim_loss for o in self.outcomes]
        larger = [o.victim_loss_larger_kept for o in self.outcomes]
        return (
            f"{100 * np.mean(losses):.1f} / {100 * max(losses):.1f} (copy {100 * max(shares):.1f}; larger value:"
            f" {100 * np.mean(larger):.1f} / {100 * max(larger):.1f})"
        )

    def honest_loss(self) -> str:
        """Mean / max share of their pay the honest members (the copied member included) lose together."""
        losses = [o.honest_loss for o in self.outcomes]
        return f"{100 * np.mean(losses):.2f} / {100 * max(losses):.2f}"

    def meets_target(self) -> bool | None:
        adversary = self.outcomes[0].adversary
        if adversary.published:
            return None
        if adversary.kind == "data-free":
            return max(self.shares()) <= TARGET_SHARE
        if adversary.kind == "same-data":
            return max(o.group_ratio for o in self.outcomes) <= TARGET_GROUP
        return max(o.victim_loss for o in self.outcomes) <= TARGET_COPY_LOSS


def world_for(name: str, members: int, seed: int) -> World:
    if name == "plaid":
        return PLAID
    return SyntheticWorld(classes=max(20, 2 * members), classes_per_member=2, seed=seed)


def examples(name: str, members: int) -> int:
    return PLAID_EXAMPLES[members] if name == "plaid" else SYNTHETIC_EXAMPLES


PLAID: World  # loaded once, when a PLAID table is asked for


def run_world(
    name: str,
    members: Sequence[int],
    seeds: Sequence[int],
    rounds: int,
    adversaries: Sequence[Adversary],
    aggregation: str,
    victims_device: bool = False,
) -> tuple[dict[tuple[int, str], Cell], dict[int, tuple[int, int]], dict[int, list[float]], float]:
    cells: dict[tuple[int, str], Cell] = {}
    exclusions: dict[int, tuple[int, int]] = {}
    accuracy: dict[int, list[float]] = defaultdict(list)
    started = time.perf_counter()
    for m in members:
        jobs: list[JobResult] = []
        for seed in seeds:
            world = world_for(name, m, seed)
            data = world.member_data([examples(name, m)] * m, seed)
            clean = Job(world, data, rounds, seed, aggregation=aggregation).run()
            jobs.append(clean)
            accuracy[m].append(clean.accuracy)
            for adversary in adversaries:
                outcome = attack(
                    world, adversary, data, rounds, seed, clean, aggregation=aggregation, victims_device=victims_device
                )
                cells.setdefault((m, adversary.name), Cell([])).outcomes.append(outcome)
                jobs.append(outcome.attacked)
        exclusions[m] = honest_exclusions(jobs, m)
        print(f"{name}, {m} members: honest exclusions by screen {honest_exclusion_reasons(jobs, m)}", flush=True)
        grouping = honest_grouping(jobs, m)
        print(
            f"{name}, {m} members: honest pair-rounds paid as one {grouping.paid} / {grouping.pair_rounds} "
            f"(round groups only: {grouping.by_round}); largest share of its pay an honest member lost to the "
            f"job-level grouping {100 * grouping.largest_loss:.2f} % ({100 * grouping.largest_loss_larger_kept:.2f} %"
            " keeping the larger value)",
            flush=True,
        )
    return cells, exclusions, accuracy, time.perf_counter() - started


def print_tables(
    title: str,
    cells: dict[tuple[int, str], Cell],
    exclusions: dict[int, tuple[int, int]],
    accuracy: dict[int, list[float]],
    members: Sequence[int],
    adversaries: Sequence[Adversary],
) -> list[str]:
    """Markdown tables; returns the targets missed."""
    missed = []
    print(f"\n#### {title}\n")
    print("| adversary | kind | " + " | ".join(f"{m} members" for m in members) + " |")
    print("|---|---|" + "---|" * len(members))
    for adversary in adversaries:
        row = []
        for m in members:
            cell = cells[(m, adversary.name)]
            met = cell.meets_target()
            mark = "" if met is None else (" ✓" if met else " ✗")
            if met is False:
                missed.append(f"{title}: {adversary.name} at {m} members: {cell.summary()}")
            row.append(cell.summary() + mark)
        name = adversary.name + (" *" if adversary.published else "")
        print(f"| {name} | {adversary.kind} | " + " | ".join(row) + " |")
    rates = []
    for m in members:
        excluded, total = exclusions[m]
        rates.append(f"{excluded} / {total} ({100 * excluded / total:.2f} %)")
        if excluded > TARGET_EXCLUSIONS * total:
            missed.append(f"{title}: honest false exclusions at {m} members: {excluded} / {total}")
    print("| honest member-rounds excluded | | " + " | ".join(rates) + " |")
    print("| clean accuracy (mean) | | " + " | ".join(f"{np.mean(accuracy[m]):.3f}" for m in members) + " |")
    print("\nhonest pay lost: mean / max share of their pay the honest members lose together with the adversary (%)\n")
    print("| adversary | " + " | ".join(f"{m} members" for m in members) + " |")
    print("|---|" + "---|" * len(members))
    for adversary in adversaries:
        name = adversary.name + (" *" if adversary.published else "")
        print(f"| {name} | " + " | ".join(cells[(m, adversary.name)].honest_loss() for m in members) + " |")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="synthetic,plaid")
    parser.add_argument("--members", default="5,10,50")
    parser.add_argument("--seeds", default="0,1,2", help="the seeds the defaults were set on")
    parser.add_argument("--holdout", default="100,101,102", help="seeds never looked at while setting defaults")
    parser.add_argument("--synthetic-rounds", type=int, default=6)
    parser.add_argument("--plaid-rounds", type=int, default=4)
    parser.add_argument("--adversaries", default="", help="comma-separated names (default: all)")
    parser.add_argument("--aggregation", default="fedavg", help="fedavg and/or fedmedian,fedtrimmedavg,krum,bulyan")
    parser.add_argument("--victims-device", action="store_true", help="the adversary is the victim's second device")
    parser.add_argument("--quick", action="store_true", help="for iteration: synthetic, 5 members, seed 0, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.worlds, args.members, args.seeds, args.holdout, args.synthetic_rounds = "synthetic", "5", "0", "", 3
    members = [int(m) for m in args.members.split(",")]
    chosen = [a for a in ADVERSARIES.values() if not args.adversaries or a.name in args.adversaries.split(",")]
    missed: list[str] = []
    for world in args.worlds.split(","):
        if world == "plaid":
            global PLAID
            PLAID = PlaidWorld()
        rounds = args.plaid_rounds if world == "plaid" else args.synthetic_rounds
        for aggregation in args.aggregation.split(","):
            for label, seeds in (("seeds", args.seeds), ("held-out seeds", args.holdout)):
                if not seeds:
                    continue
                chosen_seeds = [int(s) for s in seeds.split(",")]
                cells, exclusions, accuracy, seconds = run_world(
                    world, members, chosen_seeds, rounds, chosen, aggregation, args.victims_device
                )
                title = f"{world}, {aggregation}, {rounds} rounds, {label} {seeds} ({seconds:.0f} s)"
                if args.victims_device:
                    title += ", the adversary a device of its victim's"
                missed += print_tables(title, cells, exclusions, accuracy, members, chosen)
    print("\ncells: data-free = mean / max share of the member pool (%); same data = mean / max pay of the pair over")
    print("the member alone, settled with the job's groups (round groups: the same jobs settled by the per-round")
    print("groups alone, the baseline; larger value: the same jobs settled keeping the larger value of a linked")
    print("pair's two players, the rule before the smaller); copycat = mean / max share of its pay the member loses")
    print("(max share of the copy; larger value: the member's loss under that rule, %).")
    print("\ntargets missed:" if missed else "\nevery target met")
    for line in missed:
        print(f"- {line}")


if __name__ == "__main__":
    main()
