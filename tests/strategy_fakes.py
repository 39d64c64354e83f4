"""Driving the job strategy's wrappers without Flower's processes: a grid whose nodes answer from a function, and
replies built as the ClientApp builds them. Use inside the `in_a_task` fixture: Flower builds messages only in a task.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from coordinator.capture.round import RoundCapture
from coordinator.federation.strategy.wrapper import StrategyWrapper

WEIGHT_KEY = FedAvg().weighted_by_key
"""The MetricRecord key FedAvg weighs by, and the ClientApp writes its example count under ("num-examples")."""

Answer = RecordDict | Error | None
"""A node's answer to a message: content, an error, or None (it stays silent)."""

_ids = itertools.count()


def stamp(messages: Iterable[Message]) -> list[Message]:
    """Give each message an id, as the grid does when it pushes them."""
    stamped = list(messages)
    for message in stamped:
        message.metadata.__dict__["_message_id"] = f"message-{next(_ids)}"
    return stamped


def reply(message: Message, answer: RecordDict | Error) -> Message:
    return Message(answer, reply_to=message)  # type: ignore[call-overload]


def arrays_reply(arrays: dict[str, np.ndarray], examples: object, key: str = "arrays", **metrics: float) -> RecordDict:
    """A reply carrying one ArrayRecord under `key` and a MetricRecord with the example count under WEIGHT_KEY."""
    return RecordDict(
        {
            key: ArrayRecord({name: Array(a) for name, a in arrays.items()}),
            "metrics": MetricRecord({WEIGHT_KEY: examples, **metrics}),  # type: ignore[dict-item]
        }
    )


class AnsweringGrid:
    """The parts of a Flower Grid the wrappers and Flower's `Strategy.start` use. `connected` are the node ids the
    SuperLink lists; `answer(message)` is what the message's node sends back. Every message sent is kept in `sent`.
    """

    def __init__(self, connected: Iterable[int], answer: Callable[[Message], Answer] | None = None) -> None:
        self.connected = list(connected)
        self.answer = answer or (lambda message: None)
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.connected)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        pushed = stamp(messages)
        self.sent += pushed
        replies = []
        for message in pushed:
            answer = self.answer(message)
            if answer is not None:
                replies.append(reply(message, answer))
        return replies


class RecordingSink:
    """An UpdateSink that keeps every round capture it is handed."""

    def __init__(self) -> None:
        self.captures: list[RoundCapture] = []

    def on_round(self, capture: RoundCapture) -> None:
        self.captures.append(capture)


class HandedReplies(StrategyWrapper):
    """Flower's FedAvg, keeping the replies a wrapper above it hands it to aggregate."""

    def __init__(self) -> None:
        super().__init__(FedAvg(min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1))
        self.handed: list[Message] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.handed = list(replies)
        return super().aggregate_train(server_round, self.handed)
