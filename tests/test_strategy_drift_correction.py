"""DriftCorrection alone, around Flower's FedAvg: the gradient query before training, the screening of its answers,
and each node's offset in its own train message (protocol.tasks.drift's arithmetic, with the round's weights)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg
from strategy_fakes import WEIGHT_KEY, Answer, AnsweringGrid, arrays_reply

from coordinator.capture.round import DropReason, NodeDrop
from coordinator.federation.strategy.drift_correction import DriftCorrection
from coordinator.federation.strategy.participation import JobFailedError, Participation
from coordinator.federation.strategy.weights import AggregationWeighting, RoundWeights
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.drift import DRIFT_OFFSET_KEY, GRADIENT_KEY, drift_offsets

pytestmark = pytest.mark.usefixtures("in_a_task")

GLOBAL = {"w": np.zeros(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
MODEL = ArrayRecord({name: Array(a) for name, a in GLOBAL.items()})
EXAMPLES = {1: 10, 2: 30, 3: 60}
REPORTED_CAPPED = RoundWeights(AggregationWeighting.REPORTED_CAPPED, max_weight=10**6)


def _gradient(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    return {name: rng.standard_normal(a.shape).astype(np.float32) for name, a in GLOBAL.items()}


def _device(misbehaving: dict[int, Answer]) -> Callable[[Message], Answer]:
    """Nodes answer the query with their gradient, except those in `misbehaving`, which answer that instead."""

    def answer(message: Message) -> Answer:
        node = message.metadata.dst_node_id
        assert message.metadata.message_type == f"{MessageType.QUERY}.gradient"
        if node in misbehaving:
            return misbehaving[node]
        return arrays_reply(_gradient(node), EXAMPLES.get(node, 5), key=GRADIENT_KEY)

    return answer


def _drift(participation: Participation, strength: float = 1.0) -> DriftCorrection:
    return DriftCorrection(
        FedAvg(min_train_nodes=1, min_available_nodes=1),
        strength,
        participation,
        REPORTED_CAPPED,
        weighted_by_key=WEIGHT_KEY,
        query_timeout=3.0,
    )


def _train(strategy: DriftCorrection, grid: AnsweringGrid) -> dict[int, Message]:
    messages = strategy.configure_train(1, MODEL, ConfigRecord(), grid)  # type: ignore[arg-type]
    return {m.metadata.dst_node_id: m for m in messages}


def test_each_node_trains_with_its_own_offset_from_the_weighted_mean_gradient() -> None:
    participation = Participation([1, 2, 3], min_nodes=3)
    strategy, grid = _drift(participation, strength=0.5), AnsweringGrid([1, 2, 3], _device({}))
    train = _train(strategy, grid)

    assert sorted(m.metadata.dst_node_id for m in grid.sent) == [1, 2, 3]  # one query per node, before training
    expected = drift_offsets({n: _gradient(n) for n in EXAMPLES}, EXAMPLES, 0.5)
    assert set(train) == {1, 2, 3}
    for node, message in train.items():
        assert message.metadata.message_type == MessageType.TRAIN
        offset = {name: a.numpy() for name, a in message.content.array_records[DRIFT_OFFSET_KEY].items()}
        assert arrays_sha256(offset) == arrays_sha256(expected[node])
        assert set(message.content.array_records) == {"arrays", DRIFT_OFFSET_KEY}
        queried = strategy.queried(node)
        assert queried is not None and queried.gradient_sha256 == arrays_sha256(_gradient(node))
        assert queried.offset_sha256 == arrays_sha256(expected[node])
    assert participation.drops == []


def test_a_node_failing_the_query_is_dropped_with_a_reason_and_not_sent_training() -> None:
    participation = Participation([1, 2, 3, 4, 5, 6], min_nodes=2)
    misbehaving: dict[int, Answer] = {
        3: Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "no windows"),
        4: None,  # silent
        5: arrays_reply(_gradient(5), 5),  # its gradient not under the `gradient` key
        6: arrays_reply({"w": np.zeros(3, np.float32), "b": GLOBAL["b"]}, 5, key=GRADIENT_KEY),
    }
    strategy, grid = _drift(participation), AnsweringGrid([1, 2, 3, 4, 5, 6], _device(misbehaving))
    train = _train(strategy, grid)

    assert set(train) == {1, 2}
    assert strategy.queried(3) is None
    code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert participation.drops == [
        NodeDrop(1, 3, DropReason.ERROR_REPLY, f"gradient query: code {code}: no windows"),
        NodeDrop(1, 5, DropReason.MALFORMED_REPLY, "gradient query: need one gradient and one MetricRecord"),
        NodeDrop(1, 6, DropReason.MALFORMED_REPLY, "gradient query: arrays differ from the global model's"),
        NodeDrop(1, 4, DropReason.NO_REPLY, "gradient query"),
    ]
    assert list(participation.gone) == [4]  # silent: gone for the job; the others are asked again next round
    # The offsets come from the usable gradients alone.
    expected = drift_offsets({n: _gradient(n) for n in (1, 2)}, {1: 10, 2: 30}, 1.0)
    offset = {name: a.numpy() for name, a in train[1].content.array_records[DRIFT_OFFSET_KEY].items()}
    assert arrays_sha256(offset) == arrays_sha256(expected[1])


def test_too_few_usable_gradients_fail_the_job_with_a_reason() -> None:
    participation = Participation([1, 2, 3], min_nodes=3)
    strategy = _drift(participation)
    grid = AnsweringGrid([1, 2, 3], _device({2: Error(ErrorCode.NODE_UNAVAILABLE, "lost")}))
    with pytest.raises(JobFailedError) as err:
        strategy.configure_train(1, MODEL, ConfigRecord(), grid)  # type: ignore[arg-type]
    assert err.value.reason == "too_few_replies" and err.value.details["usable"] == 2
    assert [(d.node_id, d.reason) for d in participation.drops] == [(2, DropReason.NODE_UNAVAILABLE)]
    assert [m.metadata.message_type for m in grid.sent] == [f"{MessageType.QUERY}.gradient"] * 3  # no training


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_a_strength_outside_zero_to_one_is_refused(strength: float) -> None:
    with pytest.raises(ValueError, match="strength"):
        _drift(Participation([1], min_nodes=1), strength)


def test_query_messages_carry_the_global_model_and_the_round() -> None:
    grid = AnsweringGrid([1], _device({}))
    _train(_drift(Participation([1], min_nodes=1)), grid)
    (query,) = grid.sent
    content: RecordDict = query.content
    assert {n: a.numpy().tolist() for n, a in content.array_records["arrays"].items()} == {
        n: a.tolist() for n, a in GLOBAL.items()
    }
    assert content.config_records["config"]["server-round"] == 1
