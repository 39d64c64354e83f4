"""Planted adversaries of issue 17 in federated jobs, for bench/adversary_bench.py and
tests/test_attribution_adversaries.py.

A job here is the ServerApp's attribution path with the engine taken out: every round the honest members train from
the global model, the adversary builds its update, `value_round` screens and values the round (the sink's inputs:
earlier global models, the last global step, the validation gradient), the model is aggregated with the
valuation's weights (as coordinator.federation.strategy.valued_aggregation does) and the account is settled with
`settle_job` under the MID's default policy. Two worlds:
- `PlaidWorld`: the PLAID appliance model (protocol.tasks, Adam, as devices train it) on disjoint partitions of the
  PLAID train split, valued on the test split;
- `SyntheticWorld`: softmax regression on Gaussian classes, a task whose difficulty is set by its parameters: many
  classes, few examples per member, each member holding only a few classes (near-orthogonal honest updates).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Protocol

import numpy as np
import numpy.typing as npt

from coordinator.attribution import AttributionAccount, RoundUpdates, RoundValuation, ValuationSettings, value_round
from coordinator.config import RoyaltySettings
from coordinator.royalties import decode_record, model_attribution, settle_job

Vector = npt.NDArray[np.float32]
Data = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]
PAYMENT = 1_000_000
POLICY = RoyaltySettings(fee_bps=2000).policy()  # the MID's default rule for screened members
POOL = PAYMENT - PAYMENT * POLICY.fee_bps // 10_000


class World(Protocol):
    name: str

    def initial(self) -> Vector: ...
    def loss(self, params: Vector) -> float: ...
    def gradient(self, params: Vector) -> Vector: ...
    def accuracy(self, params: Vector) -> float: ...
    def train(self, params: Vector, data: Data, seed: int) -> Vector:
        """The member's update (its trained parameters minus `params`)."""
        ...

    def member_data(self, counts: Sequence[int], seed: int) -> list[Data]:
        """Disjoint data for members with these example counts."""
        ...


class SyntheticWorld:
    """Softmax regression on `classes` Gaussian classes in `features` dimensions; a member draws its examples from
    `classes_per_member` classes; local training is minibatch SGD (lr, batch, one epoch, shuffled by the seed)."""

    def __init__(
        self,
        *,
        classes: int = 20,
        features: int = 64,
        classes_per_member: int = 2,
        separation: float = 1.0,
        validation_per_class: int = 20,
        lr: float = 0.5,
        batch: int = 16,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng([seed, 1])
        self.name = f"synthetic C={classes} F={features} {classes_per_member}/member"
        self.classes, self.features, self.per_member = classes, features, classes_per_member
        self.lr, self.batch = lr, batch
        self.means = rng.standard_normal((classes, features)) * separation
        self.seed = seed
        self._x, self._y = self._draw(rng, np.repeat(np.arange(classes), validation_per_class))

    def _draw(self, rng: np.random.Generator, labels: npt.NDArray[np.int64]) -> Data:
        x = self.means[labels] + rng.standard_normal((len(labels), self.features))
        return x.astype(np.float32), labels.astype(np.int64)

    def member_data(self, counts: Sequence[int], seed: int) -> list[Data]:
        """Members take their classes in turn from a shuffled list: with classes >= members x classes_per_member no
        two members share a class (near-orthogonal updates); with fewer, classes are shared."""
        rng = np.random.default_rng([self.seed, seed, 2])
        order = rng.permutation(self.classes)
        data = []
        for member, count in enumerate(counts):
            held = order[[(member * self.per_member + j) % self.classes for j in range(self.per_member)]]
            data.append(self._draw(rng, rng.choice(held, count)))
        return data

    def initial(self) -> Vector:
        size = self.classes * (self.features + 1)
        # Glorot-like scale: the model starts larger than one training step, as real models do.
        scale = 1.0 / np.sqrt(self.features)
        return (scale * np.random.default_rng([self.seed, 3]).standard_normal(size)).astype(np.float32)

    def _loss_gradient(
        self, params: Vector, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
    ) -> tuple[float, Vector]:
        p = params.astype(np.float64)
        weights = p[: self.classes * self.features].reshape(self.classes, self.features)
        logits = x @ weights.T + p[self.classes * self.features :]
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        n = len(y)
        loss = float(-np.log(probabilities[np.arange(n), y] + 1e-12).mean())
        probabilities[np.arange(n), y] -= 1.0
        probabilities /= n
        gradient = np.concatenate([(probabilities.T @ x).ravel(), probabilities.sum(axis=0)])
        return loss, gradient.astype(np.float32)

    def loss(self, params: Vector) -> float:
        return self._loss_gradient(params, self._x, self._y)[0]

    def gradient(self, params: Vector) -> Vector:
        return self._loss_gradient(params, self._x, self._y)[1]

    def accuracy(self, params: Vector) -> float:
        weights = params[: self.classes * self.features].reshape(self.classes, self.features)
        predicted = (self._x @ weights.T + params[self.classes * self.features :]).argmax(axis=1)
        return float((predicted == self._y).mean())

    def train(self, params: Vector, data: Data, seed: int) -> Vector:
        x, y = data
        trained = params.astype(np.float64)
        order = np.random.default_rng(seed).permutation(len(y))
        for start in range(0, len(y), self.batch):
            batch = order[start : start + self.batch]
            trained -= self.lr * self._loss_gradient(trained.astype(np.float32), x[batch], y[batch])[1]
        return (trained - params).astype(np.float32)


class PlaidWorld:
    """The PLAID appliance task as devices train it (protocol.tasks: Adam, lr 3e-3, batch 16, one epoch); the
    validation set is PLAID's test split."""

    def __init__(self) -> None:
        import torch

        from coordinator.attribution.task_loss import TaskValidationLoss
        from edge.sensors.plaid import load_plaid
        from protocol.tasks.models import build_model, evaluate
        from protocol.tasks.spec import PLAID_APPLIANCE

        torch.set_num_threads(1)
        self.name = "PLAID"
        self.spec = PLAID_APPLIANCE
        train = load_plaid("train", length=self.spec.window_length)
        test = load_plaid("test", length=self.spec.window_length)
        self._x, self._y = train.X[:, None, :], train.y
        self._val = TaskValidationLoss(self.spec, build_model(self.spec, 0), test.X[:, None, :], test.y)
        self._test = (test.X[:, None, :], test.y)
        self._build, self._evaluate = build_model, evaluate

    def member_data(self, counts: Sequence[int], seed: int) -> list[Data]:
        order = np.random.default_rng([seed, 4]).permutation(len(self._y))
        bounds = np.cumsum([0, *counts])
        if bounds[-1] > len(order):
            raise ValueError(f"PLAID has {len(order)} training recordings, not {bounds[-1]}")
        return [(self._x[order[a:b]], self._y[order[a:b]]) for a, b in itertools.pairwise(bounds)]

    def initial(self) -> Vector:
        from protocol.tasks.models import model_arrays

        return self._val.flatten(model_arrays(self._build(self.spec, 0)))

    def loss(self, params: Vector) -> float:
        return self._val(params)

    def gradient(self, params: Vector) -> Vector:
        return self._val.gradient(params)

    def accuracy(self, params: Vector) -> float:
        from protocol.tasks.models import load_arrays

        model = self._build(self.spec, 0)
        load_arrays(model, self._val.unflatten(params))
        return float(self._evaluate(self.spec, model, *self._test)["accuracy"])

    def train(self, params: Vector, data: Data, seed: int) -> Vector:
        from protocol.tasks.models import load_arrays, model_arrays, train_epochs

        model = self._build(self.spec, 0)
        load_arrays(model, self._val.unflatten(params))
        train_epochs(self.spec, model, data[0], data[1], epochs=1, batch_size=16, lr=3e-3, seed=seed)
        return self._val.flatten(model_arrays(model)) - params


@dataclass(frozen=True)
class RoundView:
    """What an adversary knows when it builds its update: the global model it was sent, the earlier ones (most
    recent first), and for a copycat the update of the member it copies."""

    round: int
    global_params: Vector
    earlier_globals: Sequence[Vector]
    victim_update: Vector
    victim_data: Data
    world: World
    rng: np.random.Generator

    @property
    def last_step(self) -> Vector | None:
        return None if not self.earlier_globals else self.global_params - self.earlier_globals[0]

    def step_size(self) -> float:
        """The size of an honest-looking update as a data-free member can guess it: the last global step (1 % of
        the model in round 1)."""
        step = self.last_step
        if step is None or float(np.linalg.norm(step)) == 0.0:
            return 0.01 * float(np.linalg.norm(self.global_params))
        return float(np.linalg.norm(step))

    def noise(self, size: float) -> Vector:
        direction = self.rng.standard_normal(self.global_params.shape)
        return (size * direction / np.linalg.norm(direction)).astype(np.float32)

    def global_model(self, back: int) -> Vector:
        """The global model `back` rounds ago (the oldest one known when the job is younger)."""
        if back == 0 or not self.earlier_globals:
            return self.global_params
        return self.earlier_globals[min(back, len(self.earlier_globals)) - 1]


def _noisy(update: Vector, view: RoundView, energy: float) -> Vector:
    """`update` plus noise holding `energy` of the sum's energy."""
    size = float(np.linalg.norm(update)) * np.sqrt(energy / (1.0 - energy)) if np.any(update) else view.step_size()
    return (update + view.noise(size)).astype(np.float32)


@dataclass(frozen=True)
class Adversary:
    """One planted adversary: `kind` is its family (data-free, same data, copycat), `update` what it sends."""

    name: str
    kind: str
    update: Callable[[RoundView], Vector]
    published: bool = False  # an adaptive attack beyond issue 17's list: its result is published, not a target


def _scaled(alpha: float) -> Callable[[RoundView], Vector]:
    return lambda v: ((alpha - 1.0) * v.global_params).astype(np.float32)


def _mix(v: RoundView) -> Vector:
    """Equal mix of the current and the two earlier global models."""
    mixed = (v.global_model(0).astype(np.float64) + v.global_model(1) + v.global_model(2)) / 3.0
    return (mixed - v.global_params).astype(np.float32)


def _sign_momentum(v: RoundView) -> Vector:
    step = v.last_step
    if step is None:
        return _scaled(1.05)(v)
    return (v.step_size() / np.sqrt(step.size) * np.sign(step)).astype(np.float32)


def _partial_data(v: RoundView) -> Vector:
    x, y = v.victim_data
    keep = v.rng.permutation(len(y))[: max(1, int(0.7 * len(y)))]
    return v.world.train(v.global_params, (x[keep], y[keep]), 7919 + v.round)


def _same_noise(v: RoundView) -> Vector:
    """One random direction, drawn once for the job, sent every round at the last global step's size: noise that
    persists from round to round as data does (the random-direction screen's persistence rescue keeps a member whose
    residual repeats its previous one)."""
    direction = np.random.default_rng(104729).standard_normal(v.global_params.shape)
    return (v.step_size() * direction / np.linalg.norm(direction)).astype(np.float32)


def _reseeded(v: RoundView) -> Vector:
    """The member's data trained with another shuffling seed than the member's own."""
    return v.world.train(v.global_params, v.victim_data, 104729 + v.round)


def _reseeded_then_noise(v: RoundView) -> Vector:
    """The same data retrained in rounds 1-2, then a random direction of the step's size: a same-data node that
    changes behaviour once it could have been grouped, to escape the job's grouping."""
    if v.round <= 2:
        return _reseeded(v)
    return v.noise(v.step_size())


def _noisy_reseeded(v: RoundView) -> Vector:
    """The member's data trained with another seed, 70 % of the energy noise: alike enough to be grouped every round
    (0.57-0.70 on the synthetic world), and longer than the member's own update (half of the group's share or more)."""
    return _noisy(_reseeded(v), v, 0.7)


def _copy_then_faint(v: RoundView) -> Vector:
    """A copy while the job gathers its evidence (rounds 1-2, 10 % noise), then the member's update drowned in noise
    (96 % of the energy): alike enough for the job to link the pair (0.38-0.47 on the synthetic world), in most
    rounds too little for a round to make it one player, and worth little itself. Against a settlement that keeps
    the smaller value of a linked pair's two players, it drags the member it copies down to its own value in those
    rounds."""
    return _noisy(v.victim_update.copy(), v, 0.1 if v.round <= 2 else 0.96)


ADVERSARIES: dict[str, Adversary] = {
    a.name: a
    for a in (
        Adversary("scaled 1.01", "data-free", _scaled(1.01)),
        Adversary("scaled 1.05", "data-free", _scaled(1.05)),
        Adversary("scaled 1.1", "data-free", _scaled(1.1)),
        Adversary("shrunk 0.95", "data-free", _scaled(0.95)),
        Adversary("noised", "data-free", lambda v: v.noise(v.step_size())),
        Adversary("stale model", "data-free", lambda v: (v.global_model(1) - v.global_params).astype(np.float32)),
        Adversary("stale model 2", "data-free", lambda v: (v.global_model(2) - v.global_params).astype(np.float32)),
        Adversary("mix of globals", "data-free", _mix),
        Adversary(
            "extrapolated step",
            "data-free",
            lambda v: _scaled(1.05)(v) if v.last_step is None else v.last_step.astype(np.float32),
        ),
        Adversary("scaled 1.05 + noise", "data-free", lambda v: _noisy(_scaled(1.05)(v), v, 0.1), published=True),
        Adversary(
            "extrapolated + noise",
            "data-free",
            lambda v: _noisy(_scaled(1.05)(v) if v.last_step is None else v.last_step, v, 0.1),
            published=True,
        ),
        Adversary("sign of last step", "data-free", _sign_momentum, published=True),
        Adversary("same noise every round", "data-free", _same_noise, published=True),
        Adversary("re-seeded", "same-data", _reseeded),
        Adversary("70 % of the data", "same-data", _partial_data),
        Adversary("re-seeded then noise", "same-data", _reseeded_then_noise, published=True),
        Adversary("noisy re-seeded", "same-data", _noisy_reseeded, published=True),
        Adversary("half copy", "copycat", lambda v: (0.5 * v.victim_update).astype(np.float32)),
        Adversary("noisy half copy", "copycat", lambda v: _noisy(0.5 * v.victim_update, v, 0.2)),
        Adversary("exact copy", "copycat", lambda v: v.victim_update.copy(), published=True),
        Adversary("1.5x copy", "copycat", lambda v: (1.5 * v.victim_update).astype(np.float32), published=True),
        Adversary("copy then faint", "copycat", _copy_then_faint, published=True),
    )
}
VICTIM = "m000"
ADVERSARY = "adversary"


@dataclass
class JobResult:
    account: AttributionAccount
    valuations: list[RoundValuation]
    accuracy: float

    @cached_property
    def pay(self) -> dict[str, int]:
        """Each member's pay, settled with the job's same-data groups (history.AttributionAccount)."""
        return _settle(self.account)

    @cached_property
    def pay_round_groups_only(self) -> dict[str, int]:
        """The same job settled with the per-round groups alone (job-level grouping off): the baseline."""
        screens = self.account.screen_settings.model_copy(update={"same_data_reference": 1.0})
        return _settle(replace(self.account, screen_settings=screens))

    @cached_property
    def pay_larger_kept(self) -> dict[str, int]:
        """The same job settled by the rule before the smaller value (a linked pair's two players keep the larger of
        their values): the baseline of the settlement rule."""
        return _settle(replace(self.account, same_data_kept="larger"))

    def excluded(self, member: str) -> int:
        """Rounds in which a screen excluded `member`."""
        return sum(any(f.excludes for f in v.flags.get(member, [])) for v in self.valuations)


def _settle(account: AttributionAccount) -> dict[str, int]:
    attribution = model_attribution(
        account, dict.fromkeys(account.totals, 0), job_id="job", model_version="job:0", policy=POLICY
    )
    record = decode_record(settle_job(attribution, PAYMENT, record_id="settle", created_ms=1, currency="EUR"))
    return {p.member: p.amount_minor for p in record.payouts}


def flower_aggregate(aggregation: str, global_params: Vector, updates: Sequence[Vector]) -> Vector | None:
    """The next global model as the ServerApp's robust strategy for `aggregation` (server_app.robust_aggregator,
    Flower's own FedMedian, FedTrimmedAvg, Krum, Bulyan) computes it from these admitted updates; None when the
    strategy declines the round (Bulyan with fewer than 4 f + 3 replies)."""
    import logging

    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.federation.job import JobRunConfig
    from coordinator.federation.server_app import robust_aggregator

    job = JobRunConfig.from_run_config(
        {
            "task-id": "bench",
            "task-version": 1,
            "selected-nodes": " ".join(str(n) for n in range(1, len(updates) + 1)),
            "min-nodes": 1,
            "validation-path": "",
            "output-dir": "",
            "aggregation": aggregation,
        }
    )
    # Flower logs every aggregation at INFO; a table of hundreds of jobs would drown in it.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    # Flower builds messages only inside a task (it stamps them with the task's run and node).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"params": Array((global_params + u).astype(np.float32))}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            dst_node_id=0,
            message_type="train",
        )
        for u in updates
    ]
    arrays, _ = robust_aggregator(job).aggregate_train(1, replies)
    return None if arrays is None else np.asarray(arrays["params"].numpy(), dtype=np.float32)


@dataclass
class Job:
    """One job: `data` per honest device (named m000, m001, ...), optionally one adversary, `rounds` rounds,
    aggregated with the valuation's weights (`fedavg`) or by one of Flower's robust strategies. `owners` maps a
    device to the member it belongs to (default: each device is a member of its own); one member's devices are one
    player, as `job start` values them."""

    world: World
    data: list[Data]
    rounds: int
    seed: int
    adversary: Adversary | None = None
    settings: ValuationSettings = field(default_factory=ValuationSettings)
    aggregation: str = "fedavg"
    owners: dict[str, str] = field(default_factory=dict)

    def run(self) -> JobResult:
        names = [f"m{i:03d}" for i in range(len(self.data))]
        rng = np.random.default_rng([self.seed, 5])
        global_params = self.world.initial()
        earlier: list[Vector] = []
        account = AttributionAccount(screen_settings=self.settings.screens)
        valuations = []
        previous: dict[str, Vector] = {}
        groups: list[tuple[str, ...]] = []
        evidenced: set[str] = set()
        for rnd in range(1, self.rounds + 1):
            # Every honest device trains with the same per-round seed (base seed + round), as production does.
            honest = [self.world.train(global_params, d, 1000 * self.seed + rnd) for d in self.data]
            members, updates = list(names), list(honest)
            if self.adversary is not None:
                view = RoundView(rnd, global_params, tuple(earlier), honest[0], self.data[0], self.world, rng)
                members.append(ADVERSARY)
                updates.append(self.adversary.update(view))
            matrix = np.stack(updates).astype(np.float32)
            valuation = value_round(
                RoundUpdates(
                    round_index=rnd,
                    members=members,
                    global_params=global_params,
                    updates=matrix,
                    previous_global_delta=global_params - earlier[0] if earlier else None,
                    earlier_globals=tuple(earlier),
                    previous_updates=[previous.get(n) for n in members],
                    previous_groups=groups,
                    owners=[self.owners.get(n, n) for n in members] if self.owners else None,
                    evidenced=[n in evidenced for n in members],
                ),
                self.world.loss,
                self.settings,
                gradient=self.world.gradient,
            )
            account.add(valuation)
            valuations.append(valuation)
            previous = dict(zip(members, matrix, strict=True))
            groups = [g for g in valuation.players if len(g) > 1]
            evidenced |= valuation.evidenced
            earlier = [global_params, *earlier][: self.settings.screens.history_rounds]
            global_params = self._aggregate(global_params, members, matrix, valuation)
        return JobResult(account, valuations, self.world.accuracy(global_params))

    def _aggregate(
        self, global_params: Vector, members: list[str], matrix: Vector, valuation: RoundValuation
    ) -> Vector:
        """What ValuedAggregation hands the job's strategy: excluded updates left out, a norm outlier clipped and one
        member's devices scaled as they were valued, the rest weighed as valued."""
        admitted = [i for i, n in enumerate(members) if valuation.weights[n] > 0.0]
        if not admitted:
            return global_params
        if valuation.clipped or valuation.combined:
            matrix = matrix.copy()
            for i, member in enumerate(members):
                matrix[i] *= np.float32(valuation.clipped.get(member, 1.0) * valuation.combined.get(member, 1.0))
        if self.aggregation == "fedavg":
            step = sum(valuation.weights[members[i]] * matrix[i].astype(np.float64) for i in admitted)
            return (global_params + np.asarray(step)).astype(np.float32)
        aggregated = flower_aggregate(self.aggregation, global_params, [matrix[i] for i in admitted])
        return global_params if aggregated is None else aggregated


@dataclass(frozen=True)
class AttackOutcome:
    """One adversary against one set of honest members, compared with the same members alone. With
    `victims_device` the adversary is the victim's own second device: the victim's pay is then its two devices'
    (the copycat's victim loses what the member loses, the honest members' loss counts it)."""

    adversary: Adversary
    members: int
    seed: int
    clean: JobResult
    attacked: JobResult
    victims_device: bool = False

    def _member_pay(self, pay: dict[str, int]) -> dict[str, int]:
        if not self.victims_device:
            return pay
        merged = {k: v for k, v in pay.items() if k != ADVERSARY}
        merged[VICTIM] = merged.get(VICTIM, 0) + pay.get(ADVERSARY, 0)
        return merged

    @property
    def adversary_share(self) -> float:
        """The adversary's pay as a share of the member pool; as the victim's device, what the member gains by it."""
        if self.victims_device:
            return (self._member_pay(self.attacked.pay).get(VICTIM, 0) - self.clean.pay.get(VICTIM, 0)) / POOL
        return self.attacked.pay.get(ADVERSARY, 0) / POOL

    @property
    def group_ratio(self) -> float:
        """What the victim and the adversary earn together over what the victim earns alone (same data, copies)."""
        return _group_ratio(self.clean.pay, self.attacked.pay)

    @property
    def group_ratio_round_groups_only(self) -> float:
        """group_ratio with both jobs settled by the per-round groups alone (the baseline)."""
        return _group_ratio(self.clean.pay_round_groups_only, self.attacked.pay_round_groups_only)

    @property
    def group_ratio_larger_kept(self) -> float:
        """group_ratio with both jobs settled keeping the larger value of a linked pair's two players."""
        return _group_ratio(self.clean.pay_larger_kept, self.attacked.pay_larger_kept)

    @property
    def victim_loss(self) -> float:
        """The share of its pay the victim loses to the adversary."""
        return _victim_loss(self.clean.pay, self._member_pay(self.attacked.pay))

    @property
    def victim_loss_larger_kept(self) -> float:
        """victim_loss with both jobs settled keeping the larger value of a linked pair's two players."""
        return _victim_loss(self.clean.pay_larger_kept, self._member_pay(self.attacked.pay_larger_kept))

    @property
    def honest_loss(self) -> float:
        """The share of their pay the honest members (the victim included; as the victim's device, the others) lose
        together."""
        left_out = {ADVERSARY, VICTIM} if self.victims_device else {ADVERSARY}
        alone = sum(v for k, v in self.clean.pay.items() if k not in left_out)
        with_adversary = sum(v for k, v in self.attacked.pay.items() if k not in left_out)
        return 1.0 - with_adversary / alone if alone else float("nan")


def _group_ratio(clean: dict[str, int], attacked: dict[str, int]) -> float:
    alone = clean.get(VICTIM, 0)
    return (attacked.get(VICTIM, 0) + attacked.get(ADVERSARY, 0)) / alone if alone else float("nan")


def _victim_loss(clean: dict[str, int], attacked: dict[str, int]) -> float:
    alone = clean.get(VICTIM, 0)
    return 1.0 - attacked.get(VICTIM, 0) / alone if alone else float("nan")


def attack(
    world: World,
    adversary: Adversary,
    data: list[Data],
    rounds: int,
    seed: int,
    clean: JobResult | None = None,
    aggregation: str = "fedavg",
    victims_device: bool = False,
) -> AttackOutcome:
    """Run the job without and with the adversary (the clean run may be passed in, it does not depend on it). With
    `victims_device` the adversary is a second device of the member it copies (one player with it), else a member
    of its own."""
    if clean is None:
        clean = Job(world, data, rounds, seed, aggregation=aggregation).run()
    owners = {ADVERSARY: VICTIM} if victims_device else {}
    attacked = Job(world, data, rounds, seed, adversary, aggregation=aggregation, owners=owners).run()
    return AttackOutcome(adversary, len(data), seed, clean, attacked, victims_device)


def honest_exclusions(results: Sequence[JobResult], members: int) -> tuple[int, int]:
    """(member-rounds in which a screen excluded an honest member, honest member-rounds) over the jobs."""
    names = [f"m{i:03d}" for i in range(members)]
    excluded = sum(r.excluded(n) for r in results for n in names)
    return excluded, sum(len(r.valuations) * members for r in results)


def honest_exclusion_reasons(results: Sequence[JobResult], members: int) -> dict[str, int]:
    """Honest member-rounds excluded, by the screen that excluded them (a member-round may count under two)."""
    counts: dict[str, int] = {}
    for result in results:
        for valuation in result.valuations:
            for i in range(members):
                for flag in valuation.flags.get(f"m{i:03d}", []):
                    if flag.excludes:
                        counts[flag.reason.value] = counts.get(flag.reason.value, 0) + 1
    return counts


@dataclass(frozen=True)
class HonestGrouping:
    """Honest member pairs paid as one member: pair-rounds with the job's groups (`paid`) and with the per-round
    groups alone (`by_round`) out of all honest pair-rounds; and the largest share of its pay an honest member lost
    by being in a job group with another honest member (its pay with the job's groups against the per-round groups
    alone; only a job group's members can lose pay to it)."""

    paid: int
    by_round: int
    pair_rounds: int
    largest_loss: float
    largest_loss_larger_kept: float  # the same, settled keeping the larger value of a linked pair's two players


def honest_grouping(results: Sequence[JobResult], members: int) -> HonestGrouping:
    """Pairs of two honest members paid as one, over the jobs (the adversary's pairs left out)."""
    honest = {f"m{i:03d}" for i in range(members)}
    paid = by_round = pair_rounds = 0
    largest_loss = largest_loss_larger_kept = 0.0
    for result in results:
        pair_rounds += len(result.valuations) * members * (members - 1) // 2
        paid += sum(_honest_pairs(group, honest) for groups in result.account.paid_as_one() for group in groups)
        by_round += sum(_honest_pairs(player, honest) for v in result.valuations for player in v.players)
        joined = {member for pair in result.account.job_pairs() if set(pair) <= honest for member in pair}
        for member in joined:
            before = result.pay_round_groups_only.get(member, 0)
            if before > 0:
                largest_loss = max(largest_loss, 1.0 - result.pay.get(member, 0) / before)
                larger_kept = 1.0 - result.pay_larger_kept.get(member, 0) / before
                largest_loss_larger_kept = max(largest_loss_larger_kept, larger_kept)
    return HonestGrouping(paid, by_round, pair_rounds, largest_loss, largest_loss_larger_kept)


def _honest_pairs(group: Sequence[str], honest: set[str]) -> int:
    inside = sum(member in honest for member in group)
    return inside * (inside - 1) // 2
