"""The wrappers as the ServerApp stacks them for a job (server_app.aggregator + job_strategy), run round by round by
Flower's own `Strategy.start` against a grid whose nodes answer in-process: Flower's DP wrapper and its accountant
under the capture, the drift correction under it, and nothing of either set on the other between rounds; and the
same stack on the bench's FedAvg (bench/flower_default_server.py), whose federated evaluate passes through it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvgM, Result
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from pydantic import ValidationError
from strategy_fakes import WEIGHT_KEY, Answer, AnsweringGrid, RecordingSink, arrays_reply

from coordinator.federation.job import JobRunConfig
from coordinator.federation.server_app import Aggregator, aggregator, job_strategy
from coordinator.federation.strategy.participation import Participation
from protocol.tasks.drift import DRIFT_OFFSET_KEY, GRADIENT_KEY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not an installed package

from flower_default_server import flower_default_fedavg

pytestmark = pytest.mark.usefixtures("in_a_task")

GLOBAL = {"w": np.zeros(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
SELECTED = (1, 2, 3)


def _job(tmp_path: Path, **keys: object) -> JobRunConfig:
    return JobRunConfig.from_run_config(
        {
            "task-id": "plaid-appliance",
            "task-version": 1,
            "selected-nodes": " ".join(map(str, SELECTED)),
            "min-nodes": 2,
            "validation-path": str(tmp_path / "validation.npz"),
            "output-dir": str(tmp_path),
            "join-timeout": 0.0,
        }
        | keys
    )


def _device(message: Message, failing_query: tuple[int, int] | None = None) -> Answer:
    """A node's ClientApp: the global model plus 0.01 per unit of its node id for training, a gradient for a query."""
    node = message.metadata.dst_node_id
    content = message.content
    arrays = {name: a.numpy() for name, a in content.array_records["arrays"].items()}
    server_round = content.config_records["config"]["server-round"]
    if message.metadata.message_type == f"{MessageType.QUERY}.gradient":
        if failing_query == (server_round, node):
            return Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "no windows")
        return arrays_reply({n: np.full_like(a, node) for n, a in arrays.items()}, 10 * node, key=GRADIENT_KEY)
    assert message.metadata.message_type == MessageType.TRAIN
    return arrays_reply({n: a + np.float32(0.01 * node) for n, a in arrays.items()}, 10 * node)


def _run(
    job: JobRunConfig, grid: AnsweringGrid, sink: RecordingSink, aggregate: Aggregator = aggregator
) -> tuple[object, Participation, Result]:
    inner = aggregate(job)
    participation = Participation(job.selected_nodes, job.min_nodes)
    strategy = job_strategy(job, 7, inner, sink, participation, example_count_cap=None)
    result = strategy.start(
        grid,  # type: ignore[arg-type]
        ArrayRecord({name: Array(a) for name, a in GLOBAL.items()}),
        num_rounds=2,
        timeout=5.0,
        train_config=ConfigRecord(),
    )
    return inner, participation, result


def test_a_dp_job_is_clipped_accounted_and_weighted_uniformly(tmp_path: Path) -> None:
    job = _job(tmp_path, **{"dp-clipping-norm": 0.5, "dp-noise-multiplier": 0.8})
    grid, sink = AnsweringGrid([*SELECTED, 99], _device), RecordingSink()
    inner, participation, _ = _run(job, grid, sink)

    assert isinstance(inner, DifferentialPrivacyClientSideFixedClipping)
    spent = inner.privacy_spent()
    assert spent is not None and spent.num_releases == 2 and 0 < spent.epsilon < float("inf")
    assert {m.metadata.dst_node_id for m in grid.sent} == set(SELECTED)  # node 99 is not in the job
    assert all(m.content.config_records["config"][KEY_CLIPPING_NORM] == 0.5 for m in grid.sent)
    assert [c.round for c in sink.captures] == [1, 2]
    for capture in sink.captures:
        assert [(u.node_id, u.weight) for u in capture.updates] == [(1, 1), (2, 1), (3, 1)]  # the accountant's
    assert participation.drops == []


def test_a_drift_corrected_job_queries_then_trains_and_captures_both(tmp_path: Path) -> None:
    job = _job(tmp_path, **{"drift-correction": 1.0, "server-momentum": 0.5})
    assert isinstance(aggregator(job), FedAvgM)
    grid, sink = AnsweringGrid(SELECTED, lambda m: _device(m, failing_query=(1, 3))), RecordingSink()
    _, participation, _ = _run(job, grid, sink)

    sent = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    query = f"{MessageType.QUERY}.gradient"
    assert [kind for kind, _ in sent] == [query] * 3 + ["train"] * 2 + [query] * 3 + ["train"] * 3
    assert {node for _, node in sent[3:5]} == {1, 2}  # node 3 failed its query: not sent training in round 1
    assert all(DRIFT_OFFSET_KEY in m.content.array_records for m in grid.sent if m.metadata.message_type == "train")
    first, second = sink.captures
    assert [u.node_id for u in first.updates] == [1, 2] and [u.node_id for u in second.updates] == [1, 2, 3]
    assert [(d.node_id, d.detail.split(":")[0]) for d in first.drops] == [(3, "gradient query")]
    assert all(u.gradient_sha256 and u.drift_offset_sha256 for c in sink.captures for u in c.updates)
    # Weighted by the reported counts (no attribution), in the query as in the aggregate.
    assert [u.weight for u in second.updates] == [10, 20, 30]
    assert participation.gone == {}


def test_a_job_whose_minimum_exceeds_its_selected_nodes_is_refused_before_any_round(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="min-nodes 4 exceeds the 3 selected nodes"):
        _job(tmp_path, **{"min-nodes": 4})


def _evaluating_device(message: Message) -> Answer:
    """A node's ClientApp answering Flower's federated evaluate too: loss 0.1 per unit of its node id on 10 examples
    per unit of its node id; node 3 stays silent in round 1's training."""
    node = message.metadata.dst_node_id
    if message.metadata.message_type == MessageType.EVALUATE:
        return RecordDict({"metrics": MetricRecord({WEIGHT_KEY: 10 * node, "loss": 0.1 * node})})
    if message.content.config_records["config"]["server-round"] == 1 and node == 3:
        return None
    return _device(message)


def test_the_benchs_flower_fedavg_evaluates_federated_through_the_stack_and_midgates_never_does(
    tmp_path: Path,
) -> None:
    job = _job(tmp_path)
    grid, sink = AnsweringGrid([*SELECTED, 99], _evaluating_device), RecordingSink()
    _, participation, result = _run(job, grid, sink, flower_default_fedavg)

    sent = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    # Node 3 did not answer its training: it is gone for the job, so NodeSelection sends it no evaluate message.
    assert sorted(sent[:3]) == [(MessageType.TRAIN, n) for n in SELECTED]
    assert sorted(sent[3:5]) == [(MessageType.EVALUATE, 1), (MessageType.EVALUATE, 2)]
    assert sorted(sent[5:]) == [
        (MessageType.EVALUATE, 1),
        (MessageType.EVALUATE, 2),
        (MessageType.TRAIN, 1),
        (MessageType.TRAIN, 2),
    ]
    assert [d.node_id for d in participation.drops] == [3, 3]  # no reply in round 1, not asked in round 2
    # aggregate_evaluate reaches FedAvg: the example-weighted mean loss of nodes 1 and 2, (10*0.1 + 20*0.2) / 30.
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert all(m["loss"] == pytest.approx(5 / 30) for m in result.evaluate_metrics_clientapp.values())
    assert [c.round for c in sink.captures] == [1, 2]

    production = AnsweringGrid(SELECTED, _evaluating_device)
    _, _, result = _run(job, production, RecordingSink())
    assert {m.metadata.message_type for m in production.sent} == {MessageType.TRAIN}
    assert result.evaluate_metrics_clientapp == {}


def test_the_benchs_flower_fedavg_refuses_what_it_does_not_measure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="plain FedAvg"):
        flower_default_fedavg(_job(tmp_path, **{"server-momentum": 0.5}))
