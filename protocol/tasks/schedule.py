"""Learning-rate schedules over a job's rounds: the lr a device's optimiser uses in one round (pure arithmetic).

A job names its schedule in the run config (`lr-schedule`); every device derives the round's lr from that, the
job's base `lr`, `num-rounds` and the round number its train message carries, so no per-round value has to be
trusted from the wire. The central baseline of bench/fl_bench.py uses the same function over epochs, so a
federated job and the model it is compared with follow the same curve.
"""

from __future__ import annotations

import math
from enum import StrEnum

from protocol.errors import MalformedError


class LrSchedule(StrEnum):
    """How the client learning rate moves over a job's rounds."""

    CONSTANT = "constant"
    """The base lr in every round."""
    COSINE = "cosine"
    """Half a cosine from the base lr in round 1 towards 0 after the last round: smaller steps at the end, where a
    constant lr leaves the global model moving by several points of accuracy from one round to the next."""
    LATE_COSINE = "late-cosine"
    """The base lr for the first half of the steps, then half a cosine towards 0 over the second half: the same
    small final steps as COSINE without giving up half the early progress."""


def scheduled_lr(schedule: LrSchedule, base_lr: float, step: int, steps: int) -> float:
    """The lr of `step` (1-based, a round or an epoch) out of `steps`.

    Requires 1 <= step <= steps and 0 < base_lr < inf; anything else is a MalformedError naming the values.
    """
    if not math.isfinite(base_lr) or base_lr <= 0:
        raise MalformedError("base lr must be a positive finite number", found=base_lr)
    if not 1 <= step <= steps:
        raise MalformedError("step outside the schedule", expected=f"1..{steps}", found=step)
    done = (step - 1) / steps  # share of the schedule before this step, in [0, 1)
    if schedule is LrSchedule.CONSTANT:
        return base_lr
    if schedule is LrSchedule.LATE_COSINE:
        done = max(0.0, 2 * done - 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * done))
