"""A Grid that waits for replies with a short poll instead of Flower's fixed 3 s sleep, and packs model arrays.

Flower's HTTP grid sleeps 3 s between reply pulls in `send_and_receive`, which adds up to 3 s to every round after
the last node replied (measured in bench/fl_bench.py). This wraps the real grid through its public interface and
implements only `send_and_receive` with the same push-then-pull contract; Flower itself is neither patched nor
copied.

With `pack`, every message's multi-array ArrayRecords leave as one Array and packed replies are unpacked before the
strategy sees them (protocol/tasks/packed.py; the ClientApp's outermost mod does the same on the device): 6 objects a
message instead of 16, each an HTTP request the SuperLink serves. A reply that does not unpack is left as it came,
logged and counted, and the strategy drops it as `malformed_reply` (its arrays are not the global model's).

Prompt object pulls: the SuperLink hands the grid a reply as soon as its metadata arrives, while the SuperNode is
still pushing the reply's objects; Flower's object pull then backs off 1 s (doubling, `PULL_INITIAL_BACKOFF`) before
asking again. With a 0.1 s reply poll nearly every round's last reply is pulled inside that push window, so the
back-off added about 1 s to the ServerApp's turnaround, and a device whose 3 s idle poll came before the next
round's message slept another 3 s (docs/federated.md, "Performance"). On Flower's HTTP grid, `PromptObjectPull`
wraps the grid's runtime client's `PullObject` so that an object reported "not yet available" is asked for again
every 25 ms for up to 2 s before Flower's own back-off sees it. That is one method of one client instance, wrapped
from outside; Flower's code is unchanged, and a test pins the grid internals it relies on (flwr 1.42).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from protocol.errors import ProtocolError
from protocol.tasks.packed import content_is_packed, pack_content, unpack_content

log = logging.getLogger("midgate.federation.grid")

PullObjectCall = Callable[[PullObjectRequest], PullObjectResponse]


class PromptObjectPull:
    """A `PullObject` call that asks again every `interval` s, for up to `patience` s, while the object exists but
    its content has not arrived yet; then it returns what the SuperLink last said (Flower's back-off takes over).

    Parameters
    ----------
    call: the runtime client's own `PullObject`.
    interval, patience: seconds between asks and the most to spend asking (defaults 0.025 and 2.0).
    """

    def __init__(self, call: PullObjectCall, interval: float = 0.025, patience: float = 2.0) -> None:
        self.call = call
        self.interval = interval
        self.patience = patience
        self.waited = 0  # objects that were not there at the first ask (a reply pulled while it was being pushed)

    def __call__(self, request: PullObjectRequest) -> PullObjectResponse:
        response = self.call(request)
        if not response.object_found or response.object_available:
            return response
        self.waited += 1
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            time.sleep(self.interval)
            response = self.call(request)
            if not response.object_found or response.object_available:
                break
        return response


def prompt_object_pulls(grid: Grid) -> PromptObjectPull | None:
    """Wrap the `PullObject` of Flower's HTTP grid's runtime client (see the module's docstring); None, and nothing
    changed, for any other grid (the simulation's in-memory grid has no object pulls to wait for)."""
    if not isinstance(grid, HttpGrid):
        return None
    client = grid._runtime_client  # connects, as the grid's first call would
    if isinstance(client.PullObject, PromptObjectPull):
        return client.PullObject
    prompt = PromptObjectPull(client.PullObject)
    client.PullObject = prompt  # type: ignore[method-assign]
    return prompt


class PollingGrid(Grid):
    """Delegates everything to `inner`; `send_and_receive` pulls every `poll_interval` seconds (default 0.1).

    Parameters
    ----------
    inner: Flower's grid.
    poll_interval: seconds between reply pulls while replies are outstanding.
    pack: pack outgoing model arrays and unpack packed replies (default False: messages as Flower builds them).
    prompt_pulls: wrap the HTTP grid's object pulls with `PromptObjectPull` (default False: Flower's back-off).
    """

    def __init__(self, inner: Grid, poll_interval: float = 0.1, pack: bool = False, prompt_pulls: bool = False) -> None:
        self.inner = inner
        self.poll_interval = poll_interval
        self.pack = pack
        self.unpack_refused = 0
        self.prompt_pulls = prompt_object_pulls(inner) if prompt_pulls else None
        self.exchanges: list[tuple[float, float]] = []  # (pushed, last reply in), time.monotonic(), per exchange

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        outgoing = list(messages)
        if self.pack:
            # In place: the grid stamps each message's id on these objects, which the strategy matches replies by.
            for message in outgoing:
                if message.has_content():
                    message.content = pack_content(message.content)
        return self.inner.push_messages(outgoing)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        for reply in replies:
            if reply.has_content() and content_is_packed(reply.content):
                try:
                    reply.content = unpack_content(reply.content)
                except ProtocolError as error:
                    self.unpack_refused += 1
                    log.warning(
                        "packed reply refused",
                        extra={"reason": str(error.reason), "node": reply.metadata.src_node_id, "error": str(error)},
                    )
        return replies

    def server_gaps(self) -> list[float]:
        """Seconds the ServerApp spent between one exchange's last reply and the next exchange's push (aggregation,
        evaluation, captures, building and pushing the messages): the part of a round the devices wait for."""
        return [nxt[0] - prev[1] for prev, nxt in zip(self.exchanges, self.exchanges[1:], strict=False)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pushed = time.monotonic()
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
        self.exchanges.append((pushed, time.monotonic()))
        return replies
