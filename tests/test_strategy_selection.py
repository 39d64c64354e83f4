"""NodeSelection alone, around Flower's FedAvg: only the job's selected, connected nodes still in the job are sent a
message; it waits for them up to the join timeout, records who it left out and why, and fails the job below the
minimum."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from strategy_fakes import AnsweringGrid

from coordinator.capture.round import DropReason, NodeDrop
from coordinator.federation.strategy.participation import JobFailedError, Participation
from coordinator.federation.strategy.selection import NodeSelection, NodeView

pytestmark = pytest.mark.usefixtures("in_a_task")

MODEL = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})


class _Clock:
    """Monotonic time that moves only when the strategy sleeps; a node joins after `joins_after` seconds."""

    def __init__(self, grid: AnsweringGrid, joins_after: dict[int, float]) -> None:
        self.now = 0.0
        self.grid = grid
        self.joins_after = joins_after

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for node, at in self.joins_after.items():
            if self.now >= at and node not in self.grid.connected:
                self.grid.connected.append(node)


def _selection(
    participation: Participation, grid: AnsweringGrid, join_timeout: float = 0.0, **joins: float
) -> tuple[NodeSelection, _Clock]:
    clock = _Clock(grid, {int(node.removeprefix("n")): at for node, at in joins.items()})
    strategy = NodeSelection(
        FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1),
        participation,
        join_timeout=join_timeout,
        clock=clock,
        sleep=clock.sleep,
    )
    return strategy, clock


def _train_destinations(strategy: NodeSelection, server_round: int, grid: AnsweringGrid) -> set[int]:
    messages = strategy.configure_train(server_round, MODEL, ConfigRecord(), grid)  # type: ignore[arg-type]
    return {m.metadata.dst_node_id for m in messages}


def test_only_the_selected_connected_nodes_are_sent_training() -> None:
    grid = AnsweringGrid([1, 2, 3, 99])  # 99 is connected but not in this job
    participation = Participation([1, 2, 3], min_nodes=2)
    strategy, _ = _selection(participation, grid)
    assert _train_destinations(strategy, 1, grid) == {1, 2, 3}
    assert participation.drops == []


def test_a_late_node_is_waited_for_and_a_missing_one_is_recorded_not_connected() -> None:
    grid = AnsweringGrid([1])
    participation = Participation([1, 2, 3], min_nodes=2)
    strategy, clock = _selection(participation, grid, join_timeout=5.0, n2=1.0, n3=60.0)
    assert _train_destinations(strategy, 1, grid) == {1, 2}
    assert 5.0 <= clock.now < 5.5  # waited the join timeout for node 3, no longer
    assert participation.drops == [NodeDrop(1, 3, DropReason.NOT_CONNECTED)]


def test_a_node_that_never_joined_is_not_waited_for_again_but_taken_when_it_comes() -> None:
    grid = AnsweringGrid([1, 2])
    participation = Participation([1, 2, 3], min_nodes=2)
    strategy, clock = _selection(participation, grid, join_timeout=5.0)
    assert _train_destinations(strategy, 1, grid) == {1, 2}
    waited = clock.now
    assert _train_destinations(strategy, 2, grid) == {1, 2}
    assert clock.now == waited  # node 3 did not come within the first wait: round 2 does not wait for it
    grid.connected.append(3)
    assert _train_destinations(strategy, 3, grid) == {1, 2, 3}
    assert [(d.round, d.node_id) for d in participation.drops] == [(1, 3), (2, 3)]


def test_a_node_that_joined_is_waited_for_at_the_next_round() -> None:
    grid = AnsweringGrid([1, 2])
    participation = Participation([1, 2], min_nodes=1)
    strategy, clock = _selection(participation, grid, join_timeout=5.0)
    assert _train_destinations(strategy, 1, grid) == {1, 2}
    grid.connected.remove(2)  # reconnecting
    clock.joins_after = {2: clock.now + 1.0}
    assert _train_destinations(strategy, 2, grid) == {1, 2}


def test_a_node_gone_for_the_job_is_not_asked_again_even_when_connected() -> None:
    grid = AnsweringGrid([1, 2, 3])
    participation = Participation([1, 2, 3], min_nodes=2)
    participation.record([NodeDrop(1, 2, DropReason.NO_REPLY)])
    strategy, _ = _selection(participation, grid, join_timeout=30.0)
    assert _train_destinations(strategy, 2, grid) == {1, 3}
    assert participation.drops[-1] == NodeDrop(2, 2, DropReason.DROPPED_EARLIER, "no_reply")
    assert participation.exchange_drops(2) == ()  # a node the round sent nothing to is not in its capture


def test_too_few_connected_nodes_fail_the_job_with_a_reason() -> None:
    grid = AnsweringGrid([1, 2])
    participation = Participation([1, 2, 3], min_nodes=3)
    strategy, _ = _selection(participation, grid)
    with pytest.raises(JobFailedError) as err:
        strategy.configure_train(1, MODEL, ConfigRecord(), grid)  # type: ignore[arg-type]
    assert err.value.reason == "too_few_nodes"
    assert err.value.details == {"round": 1, "live": 2, "minimum": 3}
    assert participation.drops == [NodeDrop(1, 3, DropReason.NOT_CONNECTED)]


def test_federated_evaluation_goes_to_the_rounds_nodes_still_in_the_job() -> None:
    grid = AnsweringGrid([1, 2, 3, 99])
    participation = Participation([1, 2, 3], min_nodes=1)
    strategy, _ = _selection(participation, grid)
    strategy.configure_train(1, MODEL, ConfigRecord(), grid)  # type: ignore[arg-type]
    participation.record([NodeDrop(1, 3, DropReason.NODE_UNAVAILABLE)])
    messages = strategy.configure_evaluate(1, MODEL, ConfigRecord(), grid)  # type: ignore[arg-type]
    assert {m.metadata.dst_node_id for m in messages} == {1, 2}


def test_min_nodes_must_be_reachable_with_the_selected_nodes() -> None:
    with pytest.raises(ValueError, match="min_nodes"):
        Participation([1, 2], min_nodes=3)
    with pytest.raises(ValueError, match="min_nodes"):
        Participation([1, 2], min_nodes=0)


def test_the_view_a_wrapped_strategy_samples_from_is_a_flower_grid() -> None:
    view = NodeView(AnsweringGrid([5, 6, 7]), [6, 7, 8])  # type: ignore[arg-type]
    assert isinstance(view, Grid) and view.get_node_ids() == [6, 7]
