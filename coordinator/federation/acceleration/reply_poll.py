"""Replies pulled every 0.1 s instead of after Flower's fixed 3 s sleep.

Flower's HTTP grid sleeps 3 s between reply pulls in `send_and_receive` (`flwr.superlink.grid.http_grid.HttpGrid`,
flwr 1.42), which adds up to 3 s to every exchange after the last node replied (bench/fl_bench.py rounds).
`ReplyPollGrid` implements `send_and_receive` with the same push-then-pull contract on top of the wrapped grid's
public `push_messages` and `pull_messages`; Flower itself is neither patched nor copied.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from coordinator.federation.acceleration.wrapped_grid import WrappedGrid


class ReplyPollGrid(WrappedGrid):
    """`send_and_receive` pulls every `poll_interval` seconds while replies are outstanding.

    Parameters
    ----------
    inner: the grid the messages go through.
    poll_interval: seconds between reply pulls (default 0.1).
    """

    def __init__(self, inner: Grid, poll_interval: float = 0.1) -> None:
        super().__init__(inner)
        self.poll_interval = poll_interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        if not pending:
            return []  # e.g. FedAvg's evaluate step when evaluation is centralised: not an exchange with the devices
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies
