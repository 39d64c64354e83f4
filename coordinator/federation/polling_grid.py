"""A Grid that waits for replies with a short poll instead of Flower's fixed 3 s sleep, and packs model arrays.

Flower's HTTP grid sleeps 3 s between reply pulls in `send_and_receive`, which adds up to 3 s to every round after
the last node replied (measured in bench/fl_bench.py). This wraps the real grid through its public interface and
implements only `send_and_receive` with the same push-then-pull contract; Flower itself is neither patched nor
copied.

With `pack`, every message's multi-array ArrayRecords leave as one Array and packed replies are unpacked before the
strategy sees them (protocol/tasks/packed.py; the ClientApp's outermost mod does the same on the device): 6 objects a
message instead of 16, each an HTTP request the SuperLink serves. A reply that does not unpack is left as it came,
logged and counted, and the strategy drops it as `malformed_reply` (its arrays are not the global model's).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from protocol.errors import ProtocolError
from protocol.tasks.packed import content_is_packed, pack_content, unpack_content

log = logging.getLogger("midgate.federation.grid")


class PollingGrid(Grid):
    """Delegates everything to `inner`; `send_and_receive` pulls every `poll_interval` seconds (default 0.1).

    Parameters
    ----------
    inner: Flower's grid.
    poll_interval: seconds between reply pulls while replies are outstanding.
    pack: pack outgoing model arrays and unpack packed replies (default False: messages as Flower builds them).
    """

    def __init__(self, inner: Grid, poll_interval: float = 0.1, pack: bool = False) -> None:
        self.inner = inner
        self.poll_interval = poll_interval
        self.pack = pack
        self.unpack_refused = 0

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

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
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
