"""The ServerApp's half of packed model arrays: each message's multi-array ArrayRecords leave as one Array, and
packed replies are unpacked before the strategy sees them.

Flower stores and moves every Array of a message as its own objects (the Array and its chunks: flwr's inflatable
objects, `flwr.app.Array`), and each object is one HTTP request between ServerApp, SuperLink and SuperNode. A
plaid-appliance@1 message is 16 objects, 6 packed (protocol/tasks/packed.py says how, and why the layout is the
canonical encoding's). The ClientApp's outermost mod (edge.federated.acceleration.packed_arrays) unpacks a packed
message and packs its reply; it passes an unpacked message through, so this wrapper alone decides per job. A reply
that does not unpack is left as it came, logged and counted, and the strategy drops it as `malformed_reply` (its
arrays are not the global model's).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from coordinator.federation.acceleration.wrapped_grid import WrappedGrid
from protocol.errors import ProtocolError
from protocol.tasks.packed import content_is_packed, pack_content, unpack_content

log = logging.getLogger("midgate.federation.grid")


class PackedArraysGrid(WrappedGrid):
    """Packs the model arrays of every message it sends and unpacks every packed reply it receives."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.unpack_refused = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._packed(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._unpacked(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._unpacked(self.inner.send_and_receive(self._packed(messages), timeout=timeout))

    @staticmethod
    def _packed(messages: Iterable[Message]) -> list[Message]:
        outgoing = list(messages)
        # In place: the grid stamps each message's id on these objects, which the strategy matches replies by.
        for message in outgoing:
            if message.has_content():
                message.content = pack_content(message.content)
        return outgoing

    def _unpacked(self, replies: Iterable[Message]) -> list[Message]:
        received = list(replies)
        for reply in received:
            if reply.has_content() and content_is_packed(reply.content):
                try:
                    reply.content = unpack_content(reply.content)
                except ProtocolError as error:
                    self.unpack_refused += 1
                    log.warning(
                        "packed reply refused",
                        extra={"reason": str(error.reason), "node": reply.metadata.src_node_id, "error": str(error)},
                    )
        return received
