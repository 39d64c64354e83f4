"""UpdateCapture alone, around Flower's FedAvg: every train reply is matched to its node and screened, each drop keeps
its reason, the sink gets the round before aggregation, and FedAvg is handed only the usable updates, weighted and
in the global model's array order."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from strategy_fakes import WEIGHT_KEY, AnsweringGrid, HandedReplies, RecordingSink, arrays_reply, reply, stamp

from coordinator.capture.round import DropReason, NodeDrop
from coordinator.federation.strategy.drift_correction import QueriedGradient
from coordinator.federation.strategy.participation import JobFailedError, Participation
from coordinator.federation.strategy.update_capture import UpdateCapture
from coordinator.federation.strategy.weights import AggregationWeighting, RoundWeights
from protocol.tasks.arrays import arrays_sha256

pytestmark = pytest.mark.usefixtures("in_a_task")

GLOBAL = {"w": np.zeros(4, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}
REPORTED_CAPPED = RoundWeights(AggregationWeighting.REPORTED_CAPPED, max_weight=10**6)


def _trained(step: float) -> dict[str, np.ndarray]:
    return {name: a + np.float32(step) for name, a in GLOBAL.items()}


def _sent(strategy: UpdateCapture, nodes: list[int]) -> dict[int, Message]:
    """Round 1's train messages, pushed (stamped) as the grid would, by destination."""
    model = ArrayRecord({name: Array(a) for name, a in GLOBAL.items()})
    messages = stamp(strategy.configure_train(1, model, ConfigRecord(), AnsweringGrid(nodes)))  # type: ignore[arg-type]
    return {m.metadata.dst_node_id: m for m in messages}


def test_every_reply_is_screened_and_each_drop_keeps_its_reason() -> None:
    nodes = [11, 12, 13, 14, 15, 16, 17]
    participation, sink = Participation(nodes, min_nodes=1), RecordingSink()
    strategy = UpdateCapture(
        HandedReplies(), sink, participation, REPORTED_CAPPED, weighted_by_key=WEIGHT_KEY, run_id=5
    )
    sent = _sent(strategy, nodes)
    stranger = stamp([Message(RecordDict(), dst_node_id=77, message_type=MessageType.TRAIN)])[0]
    replies = [
        reply(sent[11], arrays_reply(_trained(1.0), 50, loss=0.5)),
        reply(sent[12], Error(ErrorCode.NODE_UNAVAILABLE, "missed heartbeats")),
        reply(sent[13], Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom")),
        reply(sent[14], arrays_reply({"w": np.zeros(5, np.float32), "b": GLOBAL["b"]}, 50)),
        reply(sent[16], arrays_reply(_trained(1.0), 0)),
        reply(sent[17], arrays_reply(_trained(np.nan), 50)),
        reply(sent[11], arrays_reply(_trained(2.0), 50)),  # a second reply for node 11
        reply(stranger, arrays_reply(_trained(1.0), 50)),
    ]
    strategy.aggregate_train(1, replies)

    (capture,) = sink.captures
    assert (capture.run_id, capture.round, capture.global_sha256) == (5, 1, arrays_sha256(GLOBAL))
    (update,) = capture.updates
    assert (update.node_id, update.examples_reported, update.weight) == (11, 50, 50)
    assert update.metrics == {"num-examples": 50.0, "loss": 0.5}
    assert update.update_sha256 == arrays_sha256(_trained(1.0)) and update.gradient_sha256 is None
    assert [(d.node_id, d.reason) for d in capture.drops] == [
        (12, DropReason.NODE_UNAVAILABLE),
        (13, DropReason.ERROR_REPLY),
        (14, DropReason.MALFORMED_REPLY),
        (16, DropReason.MALFORMED_REPLY),
        (17, DropReason.MALFORMED_REPLY),
        (11, DropReason.UNEXPECTED_NODE),
        (77, DropReason.UNEXPECTED_NODE),
        (15, DropReason.NO_REPLY),
    ]
    assert capture.drops[1].detail == f"code {ErrorCode.CLIENT_APP_RAISED_EXCEPTION}: boom"
    assert capture.drops[3].detail == "num-examples must be a positive int"
    assert list(participation.gone) == [12, 15]  # lost or silent: not asked again; the others may do better
    assert participation.drops == list(capture.drops)


def test_too_few_usable_updates_fail_the_job_after_the_sink_has_the_round() -> None:
    participation, sink = Participation([11, 12], min_nodes=2), RecordingSink()
    inner = HandedReplies()
    strategy = UpdateCapture(inner, sink, participation, REPORTED_CAPPED, weighted_by_key=WEIGHT_KEY)
    sent = _sent(strategy, [11, 12])
    with pytest.raises(JobFailedError) as err:
        strategy.aggregate_train(1, [reply(sent[11], arrays_reply(_trained(1.0), 9))])
    assert err.value.reason == "too_few_replies" and err.value.details["usable"] == 1
    assert [u.node_id for u in sink.captures[0].updates] == [11]
    assert sink.captures[0].drops == (NodeDrop(1, 12, DropReason.NO_REPLY),)
    assert inner.handed == []  # nothing was aggregated


def test_fedavg_gets_each_update_with_its_weight_in_the_global_models_array_order() -> None:
    participation, sink = Participation([11, 12], min_nodes=2), RecordingSink()
    inner = HandedReplies()
    uniform = RoundWeights(AggregationWeighting.UNIFORM, max_weight=5)
    strategy = UpdateCapture(inner, sink, participation, uniform, weighted_by_key=WEIGHT_KEY)
    sent = _sent(strategy, [11, 12])
    backwards = {name: _trained(1.0)[name] for name in reversed(GLOBAL)}  # as a packed reply comes back
    arrays, _ = strategy.aggregate_train(
        1, [reply(sent[12], arrays_reply(_trained(3.0), 7)), reply(sent[11], arrays_reply(backwards, 900))]
    )
    assert [m.metadata.src_node_id for m in inner.handed] == [11, 12]
    for message in inner.handed:
        assert list(message.content.array_records["arrays"]) == list(GLOBAL)  # FedAvgM pairs arrays by position
        assert message.content.metric_records["metrics"][WEIGHT_KEY] == 1
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 2.0)  # the unweighted mean of 1 and 3


def test_a_drift_corrected_update_is_captured_with_its_nodes_gradient_and_offset() -> None:
    gradient = {name: np.full_like(a, 0.5) for name, a in GLOBAL.items()}
    offset = {name: np.full_like(a, -0.25) for name, a in GLOBAL.items()}
    queried = QueriedGradient(gradient, arrays_sha256(gradient), offset, arrays_sha256(offset))
    participation, sink = Participation([11], min_nodes=1), RecordingSink()
    strategy = UpdateCapture(
        HandedReplies(),
        sink,
        participation,
        REPORTED_CAPPED,
        weighted_by_key=WEIGHT_KEY,
        queried_gradient={11: queried}.get,
    )
    sent = _sent(strategy, [11])
    strategy.aggregate_train(1, [reply(sent[11], arrays_reply(_trained(1.0), 4))])
    (update,) = sink.captures[0].updates
    assert update.gradient is gradient
    assert (update.gradient_sha256, update.drift_offset_sha256) == (queried.gradient_sha256, queried.offset_sha256)
