"""midgate's Flower ServerApp: one buyer's job on the SuperLink, evaluated on the buyer's validation set.

Component reference for the Flower app: `coordinator.federation.server_app:app`. The job comes entirely from the
run config (`JobRunConfig`); everything the run produces goes to `output-dir/run-<run id>/`: per-round captures
(coordinator.capture), `final-model.npz` and `outcome.json`. Evaluation is centralised (Flower's `evaluate_fn`), so no
federated evaluate message is ever sent: the buyer's validation data stays here, and rounds are one round trip.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from pydantic import ValidationError

from coordinator.attribution.history import AttributionAccount, to_value_units
from coordinator.attribution.round_sink import AttributionSink
from coordinator.attribution.task_loss import TaskValidationLoss
from coordinator.attribution.valuation import RoundValuation, ValuationSettings
from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import UpdateSink
from coordinator.federation.acceleration import GridAcceleration
from coordinator.federation.job import (
    TASKS_DIR,
    Aggregation,
    JobGroup,
    JobOutcome,
    JobRunConfig,
    NodeDropRecord,
    NodeHistory,
    RoundAttribution,
    SameDataSimilarity,
)
from coordinator.federation.strategy.drift_correction import DriftCorrection
from coordinator.federation.strategy.participation import JobFailedError, Participation
from coordinator.federation.strategy.selection import NodeSelection
from coordinator.federation.strategy.update_capture import UpdateCapture
from coordinator.federation.strategy.valued_aggregation import RoundVerdict, ValuedAggregation
from coordinator.federation.strategy.weights import AggregationWeighting, RoundWeights
from protocol.job_attribution import similarity_milli
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.models import build_model, evaluate, load_arrays, model_arrays
from protocol.tasks.spec import TaskSpec, load_task
from protocol.tasks.windows import WindowSet, load_window_file

app = ServerApp()


class ValidationEvaluator:
    """Flower `evaluate_fn`: the global model's loss and score on the buyer's validation windows.

    Flower calls it with the initial model (round 0) and after every round with the model the next round trains
    from, so it also shows each of them to `observe` (default None): attribution values a round's updates as deltas
    from the model it was sent (AttributionSink.observe_global). `record` (default None) receives each round's
    metrics and wall time as it is scored (CaptureDirectory.record_validation: `job start` prints them)."""

    def __init__(
        self,
        spec: TaskSpec,
        validation: WindowSet,
        tail: int = 1,
        observe: Callable[[Mapping[str, npt.NDArray[np.generic]]], None] | None = None,
        record: Callable[[int, dict[str, float], float | None], None] | None = None,
    ) -> None:
        self.spec = spec
        self.validation = validation
        self.model = build_model(spec)
        self.observe = observe
        self.record = record
        self.history: dict[int, dict[str, float]] = {}
        self.evaluated_at: dict[int, float] = {}  # monotonic time each round's global model was ready
        self.tail: deque[dict[str, npt.NDArray[np.generic]]] = deque(maxlen=tail)  # the last rounds' models

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.evaluated_at[server_round] = time.monotonic()
        model = {name: a.numpy() for name, a in arrays.items()}
        if self.observe is not None:
            self.observe(model)
        if server_round >= 1:
            self.tail.append(model)
        metrics = self.score(model)
        self.history[server_round] = metrics
        if self.record is not None:
            previous = self.evaluated_at.get(server_round - 1)
            self.record(server_round, metrics, None if previous is None else self.evaluated_at[server_round] - previous)
        return MetricRecord(dict[str, int | float | list[int] | list[float]](metrics))

    def score(self, model: Mapping[str, npt.NDArray[np.generic]]) -> dict[str, float]:
        load_arrays(self.model, model)
        return evaluate(self.spec, self.model, self.validation.x, self.validation.y)


def tail_average(models: Sequence[Mapping[str, npt.NDArray[np.generic]]]) -> dict[str, npt.NDArray[np.generic]]:
    """The element-wise mean of the models (in float64, in round order), each array in its own dtype."""
    if not models:
        raise ValueError("no global model to average")
    return {
        name: np.mean(np.stack([np.asarray(m[name], dtype=np.float64) for m in models]), axis=0).astype(first.dtype)
        for name, first in models[0].items()
    }


Aggregator = Callable[[JobRunConfig], FedAvg | DifferentialPrivacyClientSideFixedClipping]
"""What `run_job` builds the job's FedAvg with: production's is `aggregator`; bench/fl_bench.py's flower-default
configuration passes FedAvg as Flower ships it (bench/flower_default_server.py)."""


def aggregator(job: JobRunConfig) -> FedAvg | DifferentialPrivacyClientSideFixedClipping:
    """FedAvg (FedAvgM with server momentum), wrapped in Flower's client-side fixed-clipping DP (with its RDP
    accountant when noise is added; the accountant supports plain FedAvg only).

    It samples every node its grid lists: the wrappers above it (`job_strategy`) decide which nodes those are and
    never list fewer than `min-nodes`, so FedAvg's own minimums are set to that and its sampling never waits.
    Evaluation is centralised (`ValidationEvaluator`), so FedAvg never sends the federated evaluate message
    (fraction_evaluate 0, where Flower's default is 1). A job asking for robust aggregation gets Flower's strategy
    of that name instead (`robust_aggregator`)."""
    if job.aggregation is not Aggregation.FEDAVG:
        return robust_aggregator(job)
    if job.dp_clipping_norm <= 0 and job.server_momentum > 0:
        return FedAvgM(
            fraction_evaluate=0.0,
            min_train_nodes=job.min_nodes,
            min_evaluate_nodes=job.min_nodes,
            min_available_nodes=job.min_nodes,
            server_momentum=job.server_momentum,
        )
    fedavg = FedAvg(
        fraction_evaluate=0.0,
        min_train_nodes=job.min_nodes,
        min_evaluate_nodes=job.min_nodes,
        min_available_nodes=job.min_nodes,
    )
    if job.dp_clipping_norm <= 0:
        return fedavg
    accountant = None
    if job.dp_noise_multiplier > 0:
        # Every selected node takes part in every round (no sampling amplification is claimed).
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=job.dp_delta,
                population_size=len(job.selected_nodes),
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
    return DifferentialPrivacyClientSideFixedClipping(
        fedavg, job.dp_noise_multiplier, job.dp_clipping_norm, len(job.selected_nodes), accountant=accountant
    )


def robust_aggregator(job: JobRunConfig) -> FedAvg:
    """Flower's robust strategy the job names, sampling like `aggregator`'s FedAvg. Krum and Bulyan assume
    f = (selected nodes - 3) // 4 malicious nodes, the most Bulyan tolerates (it needs 4 f + 3 replies; a round with
    fewer keeps the global model)."""
    n = job.min_nodes
    sampling: dict[str, Any] = {
        "fraction_evaluate": 0.0,
        "min_train_nodes": n,
        "min_evaluate_nodes": n,
        "min_available_nodes": n,
    }
    malicious = max(0, (len(job.selected_nodes) - 3) // 4)
    if job.aggregation is Aggregation.FEDMEDIAN:
        return FedMedian(**sampling)
    if job.aggregation is Aggregation.FEDTRIMMEDAVG:
        return FedTrimmedAvg(**sampling, beta=0.2)
    if job.aggregation is Aggregation.KRUM:
        return Krum(**sampling, num_malicious_nodes=malicious)
    if job.aggregation is Aggregation.BULYAN:
        return Bulyan(**sampling, num_malicious_nodes=malicious)
    raise ValueError(f"not a robust aggregation: {job.aggregation}")


def job_strategy(
    job: JobRunConfig,
    run_id: int,
    inner: FedAvg | DifferentialPrivacyClientSideFixedClipping,
    sink: UpdateSink,
    participation: Participation,
    example_count_cap: int | None,
    verdict: RoundVerdict | None = None,
) -> Strategy:
    """The job's wrappers around `inner` (`aggregator`; coordinator.federation.strategy): selection, capture, the
    valuation's verdict on aggregation when the job is valued (`verdict`: the AttributionSink), and the drift
    correction when the job asks for it. They read and write the example count under the key FedAvg weighs by."""
    fedavg = inner if isinstance(inner, FedAvg) else inner.strategy
    if not isinstance(fedavg, FedAvg):
        raise TypeError(f"the job aggregates with FedAvg, not {type(fedavg).__name__}")
    weighting = _weighting(job)
    weights = RoundWeights(weighting, job.max_examples, example_count_cap=example_count_cap)
    aggregated: Strategy = inner
    if verdict is not None:
        aggregated = ValuedAggregation(
            inner,
            verdict,
            weighted_by_key=fedavg.weighted_by_key,
            reweigh=weighting is AggregationWeighting.FIXED,
        )
    drift = None
    if job.drift_correction > 0:
        drift = DriftCorrection(
            aggregated,
            job.drift_correction,
            participation,
            weights,
            weighted_by_key=fedavg.weighted_by_key,
            query_timeout=job.round_timeout,
        )
    capture = UpdateCapture(
        drift or aggregated,
        sink,
        participation,
        weights,
        weighted_by_key=fedavg.weighted_by_key,
        run_id=run_id,
        queried_gradient=None if drift is None else drift.queried,
    )
    return NodeSelection(capture, participation, join_timeout=job.join_timeout)


def _privacy_spent(strategy: Strategy, job: JobRunConfig) -> dict[str, float]:
    if not isinstance(strategy, DifferentialPrivacyClientSideFixedClipping):
        return {}
    spent = strategy.privacy_spent()
    report = {"clipping_norm": job.dp_clipping_norm, "noise_multiplier": job.dp_noise_multiplier}
    if spent is not None:
        report.update({"epsilon": spent.epsilon, "delta": spent.delta, "releases": float(spent.num_releases)})
    return report


def _weighting(job: JobRunConfig) -> AggregationWeighting:
    if job.dp_clipping_norm > 0:
        # Flower's DP accountant requires equal client weights; without verified counts FIXED is the same 1/n.
        return AggregationWeighting.UNIFORM
    # With attribution the model is aggregated with the weights it is valued (and members paid) with.
    return AggregationWeighting.FIXED if job.attribution else AggregationWeighting.REPORTED_CAPPED


def run_job(grid: Grid, run_id: int, job: JobRunConfig, aggregate: Aggregator = aggregator) -> JobOutcome:
    """Run the job's rounds on the FedAvg `aggregate` builds; always leaves outcome.json behind, and re-raises a
    failure after recording it."""
    started = time.monotonic()
    out_dir = job.output_dir / f"run-{run_id}"
    capture = CaptureDirectory(out_dir)
    spec = load_task(job.output_dir / TASKS_DIR, job.task_id, job.task_version)
    validation = load_window_file(job.validation_path, spec)
    sink: UpdateSink = capture
    attribution = None
    valuation = ValuationSettings(seed=job.seed)
    if job.attribution:
        owners = job.owner_of()
        attribution = AttributionSink(
            TaskValidationLoss(spec, build_model(spec), validation.x, validation.y),
            valuation,
            owner_of=lambda node: owners.get(node, str(node)),
            then=capture,
        )
        sink = attribution
    evaluator = ValidationEvaluator(
        spec,
        validation,
        job.tail_average,
        observe=None if attribution is None else attribution.observe_global,
        record=capture.record_validation,
    )
    inner = aggregate(job)
    participation = Participation(job.selected_nodes, job.min_nodes)
    strategy = job_strategy(job, run_id, inner, sink, participation, valuation.example_count_cap, attribution)
    outcome = JobOutcome(run_id=run_id, status="failed", reason="internal_error")
    acceleration: GridAcceleration | None = None
    try:
        acceleration = GridAcceleration.around(grid) if job.flower_acceleration else None
        result = strategy.start(
            grid if acceleration is None else acceleration.grid,
            ArrayRecord({name: Array(a) for name, a in model_arrays(build_model(spec, seed=job.seed)).items()}),
            num_rounds=job.num_rounds,
            timeout=job.round_timeout,
            train_config=ConfigRecord(),
            evaluate_fn=evaluator,
        )
        final: dict[str, npt.NDArray[np.generic]] = {name: a.numpy() for name, a in result.arrays.items()}
        final_metrics = evaluator.history.get(job.num_rounds, {})
        if job.tail_average > 1:
            final = tail_average(evaluator.tail)
            final_metrics = evaluator.score(final)
        with (out_dir / "final-model.npz").open("wb") as fh:
            np.savez(fh, **final)  # type: ignore[arg-type]
        outcome = JobOutcome(
            run_id=run_id,
            status="finished",
            rounds_completed=job.num_rounds,
            final_model_sha256=arrays_sha256(final),
            final_validation=final_metrics,
        )
    except JobFailedError as err:
        outcome = JobOutcome(run_id=run_id, status="failed", reason=err.reason)
        raise
    finally:
        outcome.drops = [
            NodeDropRecord(round=d.round, node_id=d.node_id, reason=str(d.reason), detail=d.detail)
            for d in participation.drops
        ]
        outcome.validation = dict(evaluator.history)
        outcome.round_seconds = {
            r: evaluator.evaluated_at[r] - evaluator.evaluated_at[r - 1]
            for r in sorted(evaluator.evaluated_at)
            if r - 1 in evaluator.evaluated_at
        }
        if outcome.status == "failed":
            outcome.rounds_completed = max((r for r in evaluator.history), default=0)
        outcome.flower_acceleration = acceleration is not None
        outcome.privacy = _privacy_spent(inner, job)
        if attribution is not None:
            record_attribution(outcome, attribution)
        outcome.seconds = time.monotonic() - started
        outcome.write(out_dir)
    return outcome


def record_attribution(outcome: JobOutcome, sink: AttributionSink) -> None:
    """The job's valuation in its outcome (`record_valuations` of the sink's account and rounds)."""
    record_valuations(outcome, sink.account, sink.valuations, [(r.round, r.reason) for r in sink.skipped])


def record_valuations(
    outcome: JobOutcome,
    account: AttributionAccount,
    valuations: Sequence[RoundValuation],
    skipped: Sequence[tuple[int, str]] = (),
) -> None:
    """The job's valuation in its outcome: each node's accumulated value and history, each round's values, screens,
    players and same-data similarities, and the job's same-data groups (what `serve` logs in the job's JOB and ROUND
    leaves and settles the job by)."""
    outcome.attribution = account.attribution_vector()
    outcome.attribution_history = {
        node: NodeHistory(
            rounds=account.member_rounds.get(node, 0),
            excluded_rounds=account.excluded_rounds.get(node, 0),
            screens=sorted(account.screens.get(node, set())),
        )
        for node in outcome.attribution
    }
    outcome.attribution_rounds = {
        v.round_index: RoundAttribution(
            method=str(v.method),
            values={node: to_value_units(value) for node, value in sorted(v.values.items())},
            screens={node: sorted({str(f.reason) for f in flags}) for node, flags in sorted(v.flags.items()) if flags},
            excluded=sorted(node for node, flags in v.flags.items() if any(f.excludes for f in flags)),
            groups=[list(player) for player in v.players if len(player) > 1],
            same_data=[
                SameDataSimilarity(pair=pair, similarity_milli=similarity_milli(s))
                for pair, s in sorted(v.similarities.items())
            ],
        )
        for v in valuations
    }
    outcome.attribution_skipped = dict(skipped)
    outcome.job_groups = [JobGroup(pair=pair, rounds=rounds) for pair, rounds in account.job_groups().items()]
    outcome.same_data_kept = account.same_data_kept


def record_refused_config(run_id: int, run_config: Mapping[str, object], error: ValidationError) -> Path | None:
    """Leave a failed outcome (`invalid_run_config`) for a run config the job refuses (e.g. drift correction with
    DP), when it at least names an output directory: `flwr run` exits 0 either way, and the coordinator reads the
    outcome. Returns the outcome's path, or None."""
    output_dir = run_config.get("output-dir")
    if not isinstance(output_dir, str) or not output_dir:
        return None
    out_dir = Path(output_dir) / f"run-{run_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
    outcome = JobOutcome(run_id=run_id, status="failed", reason="invalid_run_config", detail=problems[:1000])
    return outcome.write(out_dir)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        job = JobRunConfig.from_run_config(context.run_config)
    except ValidationError as err:
        record_refused_config(context.run_id, context.run_config, err)
        raise
    torch.set_num_threads(job.torch_threads)
    run_job(grid, context.run_id, job)
