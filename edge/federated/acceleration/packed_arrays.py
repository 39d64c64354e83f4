"""The device's half of packed model arrays, the ClientApp's outermost mod: unpack a message whose model arrays the
ServerApp packed into one Array, and pack the reply the same way (protocol/tasks/packed.py says why;
coordinator.federation.acceleration.packed_arrays is the ServerApp's half). Everything inside it, the contribution
record included, sees and hashes the named arrays. A message that is not packed passes through, and so does its
reply: the MID decides per job (`[federation] flower_acceleration`), so this mod is in every ClientApp whatever the
agent's own `flower_acceleration` says; without it a packed message could not be trained on."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from protocol.tasks.packed import content_is_packed, pack_content, unpack_content


def packed_arrays_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Unpack `msg` if packed (a malformed packing raises, which Flower returns to the ServerApp as an error reply),
    run the app, and pack the reply when the message came packed."""
    if not msg.has_content() or not content_is_packed(msg.content):
        return call_next(msg, context)
    msg.content = unpack_content(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply
