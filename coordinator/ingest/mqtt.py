"""The coordinator's MQTT session: persistent, QoS 1, manual acknowledgements, and our own in-memory bound.

paho runs its network loop in its own thread (owned and stopped by `BrokerSession`). Each received message takes a
slot of a semaphore before it is handed to the event loop and gives it back when the service settles it, so no
more than `queue_max` unacknowledged messages are ever held in memory whatever Receive Maximum the broker honours
(Mosquitto 2.0.11 was seen delivering 6,497 unacknowledged messages against an advertised 1,000). While the
semaphore is exhausted the network thread waits, and TCP pushes back on the broker.

The client is `IngestClient` (coordinator/ingest/paho_receive.py): paho with chunked reads, a direct PUBLISH callback
and PUBACKs written per settled batch, which took paho's per-message share of ingest CPU from about a third of a
verification to a few percent of one.

Message ids are only meaningful within one connection: an ack is sent only if the message arrived on the current
connection; otherwise the broker redelivers it after the reconnect and dedup answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from coordinator.ingest.paho_receive import IngestClient
from coordinator.ingest.pipeline import InboundMessage

log = logging.getLogger("midgate.ingest.mqtt")

SESSION_EXPIRY_S = 0xFFFFFFFF


@dataclass(slots=True)
class AckToken:
    """One received message's acknowledgement handle; `settled` once `BrokerSession.settle` has run for it."""

    generation: int
    message_id: int
    qos: int
    settled: bool = False


@dataclass(frozen=True)
class BrokerEndpoint:
    host: str
    port: int
    username: str
    password: str
    client_id: str
    ca_file: str | None = None
    keepalive_s: int = 30
    mqtt5: bool = True


class BrokerSession:
    """Owns one paho client. `start()` connects in the background; `stop()` disconnects and joins the thread."""

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        filters: tuple[str, ...],
        deliver: Callable[[InboundMessage], None],
        queue_max: int,
        receive_maximum: int,
    ) -> None:
        self.endpoint = endpoint
        self.filters = filters
        self._deliver = deliver
        self._slots = threading.BoundedSemaphore(queue_max)
        self._queue_max = queue_max
        self._receive_maximum = receive_maximum
        self._generation = 0
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self.connects = 0
        protocol = paho.MQTTv5 if endpoint.mqtt5 else paho.MQTTv311
        client = IngestClient(
            CallbackAPIVersion.VERSION2,
            client_id=endpoint.client_id,
            protocol=protocol,
            manual_ack=True,
            clean_session=None if endpoint.mqtt5 else False,
        )
        client.username_pw_set(endpoint.username, endpoint.password)
        if endpoint.ca_file:
            client.tls_set(ca_certs=endpoint.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_received = self._on_received
        # Only QoS 2 still takes paho's own path; the subscriptions are QoS 1, so the broker never sends it.
        client.on_message = lambda c, u, m: self._on_received(m.topic, bytes(m.payload), m.mid, m.qos)
        self._client = client

    def start(self) -> None:
        props = None
        if self.endpoint.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = self._receive_maximum
            self._client.connect_async(
                self.endpoint.host, self.endpoint.port, self.endpoint.keepalive_s, clean_start=False, properties=props
            )
        else:
            self._client.connect_async(self.endpoint.host, self.endpoint.port, self.endpoint.keepalive_s)
        self._client.loop_start()

    def stop(self) -> None:
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection", extra={"reason": str(reason)})
            return
        self._generation += 1
        self.connects += 1
        for topic_filter in self.filters:
            client.subscribe(topic_filter, qos=1)
        self.connected.set()
        log.info("connected to broker", extra={"generation": self._generation, "session_present": str(flags)})

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("broker connection lost", extra={"reason": str(reason)})

    def _on_received(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        # Once stopping, a message that finds no free slot is dropped at once (unacknowledged, so the broker redelivers
        # it): a 0.5 s wait for each of the hundreds of PUBLISHes in one read chunk outlasts any stop grace period.
        while not self._slots.acquire(timeout=0 if self._stopping.is_set() else 0.5):
            if self._stopping.is_set():
                return
        self._deliver(InboundMessage(topic, payload, AckToken(self._generation, mid, qos), time.monotonic_ns()))

    def settle(self, token: object, ack: bool = True) -> None:
        """Acknowledge (if still on the same connection) and free the message's slot. Call once per message; a
        second call for the same token is refused with a warning and changes nothing.

        `ack=False` frees the slot only; the broker redelivers the message after the next reconnect.
        """
        self.settle_all((token,), ack)

    def settle_all(self, tokens: Iterable[object], ack: bool = True) -> None:
        """`settle` for each of `tokens`, with one request for their PUBACKs and one release of their slots: settled
        one by one, the semaphore's and the ack queue's locks cost the event loop about 2 us per report."""
        generation = self._generation
        mids: list[int] = []
        freed = 0
        for token in tokens:
            assert isinstance(token, AckToken)
            if token.settled:
                # A recovery path that settles a whole batch may meet messages settled before the failure: acking or
                # freeing a slot twice would ack another message or overrun the bound (BoundedSemaphore raises).
                log.warning("message settled twice", extra={"message_id": token.message_id})
                continue
            token.settled = True
            freed += 1
            if ack and token.qos > 0 and token.generation == generation:
                if token.qos == 1:
                    mids.append(token.message_id)
                else:
                    self._client.ack(token.message_id, token.qos)
        self._client.ack_soon_all(mids)
        if freed:
            self._slots.release(freed)

    def redeliver_unacknowledged(self) -> None:
        """Drop the connection so that the broker redelivers every unacknowledged message on the resumed session.

        Shutting the socket down (rather than calling paho from this thread) makes paho's own loop see a lost
        connection and reconnect as it would after a network failure.
        """
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # also ssl.SSLSocket
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=qos, retain=retain)

    @property
    def in_memory(self) -> int:
        return self._queue_max - self._slots._value


async def collect_batch(
    inbox: deque[InboundMessage], arrived: asyncio.Event, batch_max: int, window_ms: int
) -> list[InboundMessage]:
    """Up to `batch_max` messages from `inbox`, waiting at most `window_ms` after the call for more to arrive.

    `arrived` is set by whoever appends to `inbox` (the MQTT thread, through the event loop)."""
    batch: list[InboundMessage] = []
    deadline = time.monotonic() + window_ms / 1000
    while True:
        while inbox and len(batch) < batch_max:
            batch.append(inbox.popleft())
        remaining = deadline - time.monotonic()
        if len(batch) >= batch_max or remaining <= 0:
            return batch
        arrived.clear()
        if inbox:
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), remaining)
