"""Planted behaviours in real federated training on PLAID: real torch updates from protocol.tasks' model trained on
disjoint partitions of the PLAID train split, valued on the test split (the buyer's validation set), aggregated with
the valuation's weights round after round, then settled. No Flower processes: this is the strategy's code path
(screen -> value -> aggregate -> account -> settle) with the engine taken out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from coordinator.attribution import (
    AttributionAccount,
    RoundUpdates,
    RoundValuation,
    ScreenReason,
    ValuationSettings,
    value_round,
)
from coordinator.attribution.task_loss import TaskValidationLoss
from coordinator.royalties import KnobPolicy, RoyaltyPolicy, decode_record, model_attribution, settle_job
from edge.sensors.plaid import load_plaid
from protocol.tasks.models import build_model, load_arrays, model_arrays, train_epochs
from protocol.tasks.spec import PLAID_APPLIANCE as SPEC

POLICY = RoyaltyPolicy(
    version=1,
    fee_bps=2000,
    knob=KnobPolicy(base_price_minor=10_000, min_price_minor=1_000, max_price_minor=100_000),
)
PAYMENT = 1_000_000


@dataclass(frozen=True)
class Member:
    name: str
    x: np.ndarray
    y: np.ndarray
    behaviour: str = "honest"
    reported_examples: int | None = None


@dataclass(frozen=True)
class Plaid:
    train_x: np.ndarray
    train_y: np.ndarray
    val: TaskValidationLoss


@pytest.fixture(scope="module")
def plaid() -> Plaid:
    train = load_plaid("train", length=SPEC.window_length)
    test = load_plaid("test", length=SPEC.window_length)
    val = TaskValidationLoss(SPEC, build_model(SPEC, 0), test.X[:, None, :], test.y)
    return Plaid(train.X[:, None, :], train.y, val)


def partitions(plaid: Plaid, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(plaid.train_y))
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] <= len(order)
    return [order[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]


def flip_labels(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flipped = y.copy()
    idx = rng.choice(len(y), round(fraction * len(y)), replace=False)
    flipped[idx] = (flipped[idx] + rng.integers(1, len(SPEC.labels), len(idx))) % len(SPEC.labels)
    return flipped


def local_update(plaid: Plaid, member: Member, global_flat: np.ndarray, previous: np.ndarray | None, rnd: int):
    """What the member sends back, minus the global model it received."""
    val = plaid.val
    if member.behaviour == "honest":
        model = build_model(SPEC, 0)
        load_arrays(model, val.unflatten(global_flat))
        # Same per-round seed on every device, as edge/federated/training.py derives it (base seed + round).
        train_epochs(SPEC, model, member.x, member.y, epochs=1, batch_size=16, lr=3e-3, seed=rnd)
        return val.flatten(model_arrays(model)) - global_flat
    if member.behaviour == "zero":
        return np.zeros_like(global_flat)
    if member.behaviour == "global":
        # The received model sent back untouched, through the same array round trip as a real reply.
        return val.flatten(val.unflatten(global_flat)) - global_flat
    if member.behaviour == "random":
        return val.flatten(model_arrays(build_model(SPEC, 1000 + rnd))) - global_flat
    if member.behaviour == "stale":
        if previous is None:
            return np.zeros_like(global_flat)
        noise = np.random.default_rng(rnd).standard_normal(previous.shape).astype(np.float32)
        return previous + 0.01 * float(np.linalg.norm(previous)) / np.sqrt(previous.size) * noise
    raise AssertionError(member.behaviour)


def run_job(
    plaid: Plaid,
    members: Sequence[Member],
    rounds: int,
    settings: ValuationSettings | None = None,
    verified: Sequence[int] | None = None,
) -> tuple[AttributionAccount, list[RoundValuation]]:
    settings = settings or ValuationSettings()
    global_flat = plaid.val.flatten(model_arrays(build_model(SPEC, 0)))
    previous = None
    account = AttributionAccount()
    valuations = []
    names = [m.name for m in members]
    for rnd in range(1, rounds + 1):
        updates = np.stack([local_update(plaid, m, global_flat, previous, rnd) for m in members])
        valuation = value_round(
            RoundUpdates(
                round_index=rnd,
                members=names,
                global_params=global_flat,
                updates=updates,
                reported_examples=[m.reported_examples or len(m.y) for m in members],
                verified_examples=list(verified) if verified is not None else None,
                previous_global_delta=previous,
            ),
            plaid.val,
            settings,
        )
        account.add(valuation)
        valuations.append(valuation)
        aggregate = sum(valuation.weights[n] * updates[i] for i, n in enumerate(names))
        assert isinstance(aggregate, np.ndarray)
        previous = aggregate.astype(np.float32)
        global_flat = global_flat + previous
    return account, valuations


def payouts(account: AttributionAccount, job: str = "job-1") -> dict[str, int]:
    attribution = model_attribution(
        account, dict.fromkeys(account.totals, 0), job_id=job, model_version=f"{job}.v1", policy=POLICY
    )
    record = decode_record(settle_job(attribution, PAYMENT, record_id=f"{job}.s", created_ms=1, currency="EUR"))
    assert record.fee_minor + sum(p.amount_minor for p in record.payouts) + record.unallocated_minor == PAYMENT
    return {p.member: p.amount_minor for p in record.payouts}


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    def ranks(v: Sequence[float]) -> np.ndarray:
        arr = np.asarray(v, dtype=float)
        return np.array([np.mean(np.nonzero(np.sort(arr) == x)[0]) for x in arr])

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_free_riders_earn_nothing(plaid: Plaid) -> None:
    parts = partitions(plaid, [120, 120, 120, 120])
    honest = [Member(f"honest-{i}", plaid.train_x[p], plaid.train_y[p]) for i, p in enumerate(parts)]
    riders = [
        Member(f"rider-{kind}", plaid.train_x[:1], plaid.train_y[:1], behaviour=kind)
        for kind in ("zero", "global", "random", "stale")
    ]
    account, valuations = run_job(plaid, honest + riders, rounds=3)
    paid = payouts(account)

    for rider in riders:
        assert account.totals[rider.name] == 0.0
        assert paid[rider.name] == 0
    for member in honest:
        assert account.totals[member.name] > 0.0
        assert paid[member.name] > 0
    assert sum(paid[m.name] for m in honest) == PAYMENT - PAYMENT * POLICY.fee_bps // 10_000

    for valuation in valuations:
        reasons = {name: {f.reason for f in flags} for name, flags in valuation.flags.items()}
        assert ScreenReason.ZERO_UPDATE in reasons["rider-zero"]
        assert ScreenReason.ZERO_UPDATE in reasons["rider-global"]
        assert ScreenReason.RANDOM_WEIGHTS in reasons["rider-random"]
        expected_stale = ScreenReason.ZERO_UPDATE if valuation.round_index == 1 else ScreenReason.STALE_UPDATE
        assert expected_stale in reasons["rider-stale"]
        assert not any(name.startswith("honest") for name in reasons), reasons


def test_label_noise_ladder_orders_values(plaid: Plaid) -> None:
    noise = [0.0, 0.1, 0.2, 0.4]
    parts = partitions(plaid, [134, 134, 134, 134], seed=1)
    members = [
        Member(f"noise-{int(q * 100):02d}", plaid.train_x[p], flip_labels(plaid.train_y[p], q, seed=i))
        for i, (p, q) in enumerate(zip(parts, noise, strict=True))
    ]
    account, _ = run_job(plaid, members, rounds=4)
    values = [account.totals[m.name] for m in members]
    assert spearman(noise, [-v for v in values]) >= 0.9, values
    paid = payouts(account)
    assert paid[members[0].name] > paid[members[-1].name]


def test_sybil_pair_earns_no_more_than_one_member(plaid: Plaid) -> None:
    parts = partitions(plaid, [110, 110, 110, 110], seed=2)
    honest = [Member(f"honest-{i}", plaid.train_x[p], plaid.train_y[p]) for i, p in enumerate(parts[:3])]
    x, y = plaid.train_x[parts[3]], plaid.train_y[parts[3]]

    single_account, _ = run_job(plaid, [*honest, Member("solo", x, y)], rounds=3)
    single = payouts(single_account)["solo"]
    sybil_account, valuations = run_job(plaid, [*honest, Member("sybil-a", x, y), Member("sybil-b", x, y)], rounds=3)
    sybil = payouts(sybil_account)

    assert single > 0
    assert sybil["sybil-a"] + sybil["sybil-b"] <= 1.05 * single
    for valuation in valuations:
        assert ("sybil-a", "sybil-b") in valuation.players
        assert ScreenReason.NEAR_DUPLICATE in {f.reason for f in valuation.flags["sybil-b"]}


def test_inflated_example_count_is_paid_as_true_count(plaid: Plaid) -> None:
    sizes = [60, 120, 180, 170]
    parts = partitions(plaid, sizes, seed=3)
    settings = ValuationSettings(example_count_cap=1_000)
    truthful = [Member(f"m{i}", plaid.train_x[p], plaid.train_y[p]) for i, p in enumerate(parts)]
    liar = Member("m1", truthful[1].x, truthful[1].y, reported_examples=10 * sizes[1])
    inflated = [truthful[0], liar, *truthful[2:]]

    honest_account, _ = run_job(plaid, truthful, rounds=3, settings=settings, verified=sizes)
    lying_account, lying_valuations = run_job(plaid, inflated, rounds=3, settings=settings, verified=sizes)
    assert payouts(lying_account) == payouts(honest_account)
    for valuation in lying_valuations:
        assert {f.reason for f in valuation.flags["m1"]} == {ScreenReason.SELF_REPORT_MISMATCH}

    # Had the coordinator weighted by the claim, the lie would have changed the pay: the equality above is not luck.
    trusting = [sizes[0], 10 * sizes[1], *sizes[2:]]
    trusting_account, _ = run_job(plaid, inflated, rounds=3, settings=settings, verified=trusting)
    assert payouts(trusting_account)["m1"] != payouts(honest_account)["m1"]
