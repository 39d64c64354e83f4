"""Node selection: a job's messages go only to its selected nodes that are connected and still in the job."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore.run import Run

from coordinator.capture.round import DropReason, NodeDrop
from coordinator.federation.strategy.participation import Participation
from coordinator.federation.strategy.wrapper import StrategyWrapper


class NodeView(Grid):
    """`grid` as a wrapped strategy sees it: it lists only `node_ids` (those of them that are connected), so Flower's
    sampling (`grid.get_node_ids()`) can pick no other node; messages still go through `grid` itself."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self.grid = grid
        self.node_ids = frozenset(node_ids)

    def get_node_ids(self) -> list[int]:
        return [n for n in self.grid.get_node_ids() if n in self.node_ids]

    def get_nodes(self) -> list[NodeInfo]:
        return [n for n in self.grid.get_nodes() if n.node_id in self.node_ids]

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class NodeSelection(StrategyWrapper):
    """Restricts a strategy to the job's selected nodes that are connected and not gone for the job.

    At the start of each round it waits up to `join_timeout` for the nodes it expects to connect, records each one
    left out (`not_connected`, `dropped_earlier`) and fails the job with `too_few_nodes` when fewer than the
    participation's minimum remain; the wrapped strategy then samples from a `NodeView` of the remaining ones. It
    expects every selected node at the first round, later only those that joined a round: a node that did not come
    within the first wait costs no round its timeout again, and takes part as soon as it is connected at a round's
    start. A federated evaluation, when the wrapped strategy asks for one, goes to the round's nodes that are still in
    the job.

    Parameters
    ----------
    strategy:
        The wrapped strategy. It should sample every node its grid lists (FedAvg with `fraction_train` 1.0 and
        `min_train_nodes`, `min_available_nodes` at most the participation's `min_nodes`): selection has decided.
    participation:
        The job's selected nodes, drops and minimum, shared with the job's other wrappers.
    join_timeout:
        Seconds to wait at the start of a round for the selected nodes to connect (default 60).
    clock, sleep:
        Monotonic seconds and a sleep (default `time.monotonic`, `time.sleep`).
    """

    def __init__(
        self,
        strategy: Strategy,
        participation: Participation,
        *,
        join_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(strategy)
        self.participation = participation
        self.join_timeout = join_timeout
        self._clock = clock
        self._sleep = sleep
        self._round_nodes: frozenset[int] = frozenset()
        self._joined: set[int] | None = None  # nodes connected at a round's start; None before the first round

    def _connected(self, grid: Grid) -> frozenset[int]:
        wanted = self.participation.selected - set(self.participation.gone)
        expected = wanted if self._joined is None else wanted & self._joined
        deadline = self._clock() + self.join_timeout
        while True:
            live = wanted & set(grid.get_node_ids())
            if expected <= live or self._clock() >= deadline:
                self._joined = (self._joined or set()) | live
                return live
            self._sleep(0.2)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        live = self._connected(grid)
        gone = self.participation.gone
        left_out = [NodeDrop(server_round, n, DropReason.DROPPED_EARLIER, str(gone[n].reason)) for n in gone]
        left_out += [
            NodeDrop(server_round, n, DropReason.NOT_CONNECTED)
            for n in sorted(self.participation.selected - live - set(gone))
        ]
        self.participation.record(left_out)
        self.participation.require(
            len(live), "too_few_nodes", "too few selected nodes connected", round=server_round, live=len(live)
        )
        self._round_nodes = live
        return self.strategy.configure_train(server_round, arrays, config, NodeView(grid, live))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        still_in = self._round_nodes - set(self.participation.gone)
        return self.strategy.configure_evaluate(server_round, arrays, config, NodeView(grid, still_in))
