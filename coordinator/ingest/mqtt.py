"""The ingest's MQTT client: QoS 1 messages acknowledged only when the service settles them (after the ledger commit),
never more than `queue_max` of them in memory, paho driven from the event loop.

    async with ManualAckClient(endpoint, queue_max, receive_maximum) as client:
        await client.subscribe(*filters)
        async for message in client.messages:        # or, a batch at a time: await client.batch(500, 10)
            ...                                      # commit
            client.settle(message.token)             # the PUBACK

This is aiomqtt's shape and aiomqtt's way of running paho (paho's socket callbacks register its socket with the event
loop; `loop_read`, `loop_write` and `loop_misc` run on the loop; the blocking part of connecting, DNS, TCP and the TLS
handshake, runs in the default executor; no network thread, no thread-to-loop bridge). aiomqtt itself (the agent's
session and job invitations use it) cannot serve ingest: it acknowledges each message as paho hands it over (paho's
manual acknowledgement is not exposed, aiomqtt#345) and its message queue either grows without bound or drops
messages. The errors are aiomqtt's (`MqttError`, and `MqttCodeError` carrying the MQTT reason code); reconnecting
with backoff is protocol.reconnect's, shared with the agent.

The bound: each delivered message takes a place until it is settled. With no place left the client stops reading its
socket (the rest of the last read stays unparsed in memory, at most `READ_CHUNK` bytes), TCP pushes back on the
broker, and reading resumes when settled messages free places: no more than `queue_max` unacknowledged messages are
ever held whatever Receive Maximum the broker honours (Mosquitto 2.0.11 was seen delivering 6,497 unacknowledged
messages against an advertised 1,000).

Message ids name messages of one connection only: a message is acknowledged only if it arrived on the connection that
is up when it is settled; otherwise the broker redelivers it on the resumed session and dedup answers it.

The receive path (`ChunkedReceivePaho`) replaces paho's, measured on paho-mqtt 2.2.0 (bench/ingest_bench.py, py-spy)
at about a third of a raw Ed25519 verification per message: paho reads each packet with separate `recv` calls (one
byte of command, one per length byte, then the body) and builds a `Properties` object and an `MQTTMessage` (which owns
a `threading.Condition`) for every PUBLISH. Here the socket is read in chunks of up to `READ_CHUNK` bytes, a QoS 0/1
PUBLISH is decoded directly (topic, packet id; MQTT 5 properties skipped: ingest reads none, and the broker sends no
topic alias because CONNECT announces a Topic Alias Maximum of 0, paho's default, MQTT 5 §3.1.2.11.5), every other
packet goes to paho's own handler, and the PUBACKs of one settled batch go out as one write. It overrides paho's
private `_packet_read` and uses private state; it is pinned to the paho-mqtt versions in `PAHO_VERSIONS`, and
tests/test_ingest_mqtt.py fails when paho's version or the internals used here change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from aiomqtt import MqttCodeError, MqttError
from paho.mqtt import __version__ as _paho_version
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from coordinator.ingest.pipeline import InboundMessage
from protocol.reconnect import staying_connected

log = logging.getLogger("midgate.ingest.mqtt")

SESSION_EXPIRY_S = 0xFFFFFFFF
PAHO_VERSIONS = frozenset({"2.2.0"})
"""The paho-mqtt versions whose private receive path `ChunkedReceivePaho` was checked against."""
READ_CHUNK = 256 * 1024
"""Bytes asked of the socket per read: a few hundred reports; more only sits in our buffer instead of the kernel's."""
CONNECT_TIMEOUT_S = 30.0
"""From the TCP connection to the CONNACK, and for a SUBACK."""
DISCONNECT_GRACE_S = 5.0
"""How long leaving waits for the acknowledgements and the DISCONNECT to be written."""
_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_HEADER = struct.Struct("!BBH")


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
    reconnect_s: tuple[float, float] = (1.0, 10.0)
    """First and largest delay between connection attempts (protocol.reconnect)."""


@dataclass(slots=True)
class AckToken:
    """One received message's acknowledgement handle; `settled` once `ManualAckClient.settle` has run for it."""

    connection: int
    message_id: int
    qos: int
    settled: bool = False


# --- packets ---------------------------------------------------------------------------------------------------------


def split_packet(buf: bytearray | bytes, start: int) -> tuple[int, int, int] | None:
    """(command byte, body start, body end) of the MQTT packet at `buf[start:]`; None if it is not complete yet.

    Raises MalformedPacket for a remaining length longer than 4 bytes (MQTT 5 §1.5.5)."""
    end_of_buf = len(buf)
    pos = start + 1
    length = 0
    shift = 0
    while True:
        if pos >= end_of_buf:
            return None
        byte = buf[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 28:
            raise MalformedPacket("remaining length longer than 4 bytes")
    if pos + length > end_of_buf:
        return None
    return buf[start], pos, pos + length


def decode_publish(command: int, body: bytes | bytearray, mqtt5: bool) -> tuple[str, bytes, int, int]:
    """(topic, payload, packet id, qos) of a QoS 0 or 1 PUBLISH body; MQTT 5 properties are skipped.

    Raises MalformedPacket for a body shorter than its own lengths say, or a topic that is not UTF-8."""
    qos = (command >> 1) & 0x03
    size = len(body)
    if size < 2:
        raise MalformedPacket("PUBLISH shorter than its topic length")
    pos = 2 + ((body[0] << 8) | body[1])
    if pos > size:
        raise MalformedPacket("PUBLISH topic runs past the packet")
    try:
        topic = bytes(body[2:pos]).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket("PUBLISH topic is not UTF-8") from None
    mid = 0
    if qos:
        if pos + 2 > size:
            raise MalformedPacket("PUBLISH packet id runs past the packet")
        mid = (body[pos] << 8) | body[pos + 1]
        pos += 2
    if mqtt5:
        props_len, shift = 0, 0
        while True:
            if pos >= size:
                raise MalformedPacket("PUBLISH properties run past the packet")
            byte = body[pos]
            pos += 1
            props_len |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 28:
                raise MalformedPacket("property length longer than 4 bytes")
        pos += props_len
        if pos > size:
            raise MalformedPacket("PUBLISH properties run past the packet")
    return topic, bytes(body[pos:]), mid, qos


def _fresh_in_packet() -> paho._InPacket:
    """paho's idle `_in_packet` state (client.py, `_packet_read`'s reset)."""
    return {
        "command": 0,
        "have_remaining": 0,
        "remaining_count": [],
        "remaining_mult": 1,
        "remaining_length": 0,
        "packet": bytearray(b""),
        "to_process": 0,
        "pos": 0,
    }


# --- paho with the ingest's receive path -----------------------------------------------------------------------------


OnPublish = Callable[[str, bytes, int, int], None]
"""(topic, payload, packet id, qos) of one QoS 0/1 PUBLISH."""


class ChunkedReceivePaho(paho.Client):
    """`paho.Client` whose receive path reads the socket in chunks, hands each QoS 0/1 PUBLISH to `on_publish_packet`
    while `places` lasts, and leaves every other packet (CONNACK, SUBACK, PUBACK, PINGRESP, DISCONNECT, QoS 2) to
    paho. With no place left it stops parsing (`held_back`) and keeps the rest of the chunk for `read_buffered`."""

    def __init__(self, places: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.places = places
        self.held_back = False
        self.on_publish_packet: OnPublish = lambda topic, payload, mid, qos: None
        self._chunk = bytearray()
        self._chunk_sock: object = None

    def queue_pubacks(self, mids: Sequence[int]) -> None:
        """The PUBACKs of QoS 1 packets `mids` as one packet in paho's out queue (one `send`, not one each)."""
        packet = b"".join([_PUBACK_HEADER.pack(_PUBACK, 2, mid) for mid in mids])
        self._packet_queue(_PUBACK, packet, 0, 0)

    def read_buffered(self) -> MQTTErrorCode:
        """Handle the complete packets already read (after `held_back`, once places were freed)."""
        self.held_back = False
        if self._sock is None or self._sock is not self._chunk_sock:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._handle_chunk(self._sock)

    def _packet_read(self) -> MQTTErrorCode:
        """One socket read, then every complete packet in what has arrived (paho: one recv per header byte)."""
        sock = self._sock
        if sock is not self._chunk_sock:
            # A new connection: bytes left over from the old one belong to no packet of this one.
            self._chunk = bytearray()
            self._chunk_sock = sock
        try:
            data = self._sock_recv(READ_CHUNK)
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:
            self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        if not data:
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        self._chunk += data
        if self.held_back:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        rc = self._handle_chunk(sock)
        return MQTTErrorCode.MQTT_ERR_AGAIN if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else rc

    def _handle_chunk(self, sock: object) -> MQTTErrorCode:
        buf = self._chunk
        start = 0
        mqtt5 = self._protocol == paho.MQTTv5
        on_publish = self.on_publish_packet
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                found = split_packet(buf, start)
                if found is None:
                    break
                command, body_start, body_end = found
                if command & 0xF0 == _PUBLISH and command & 0x06 != 0x04:  # QoS 2 keeps paho's state machine
                    if self.places <= 0:
                        self.held_back = True
                        break
                    self.places -= 1
                    start = body_end
                    on_publish(*decode_publish(command, buf[body_start:body_end], mqtt5))
                    continue
                start = body_end
                self._in_packet["command"] = command
                self._in_packet["packet"] = buf[body_start:body_end]
                self._in_packet["remaining_length"] = body_end - body_start
                rc = self._packet_handle()
                if self._sock is not sock:
                    break  # a DISCONNECT or a callback closed the connection: the rest of the chunk is void
        except MalformedPacket as exc:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        finally:
            del buf[:start]
            self._in_packet = _fresh_in_packet()
        return rc


def paho_version() -> str:
    return str(_paho_version)


# --- the client ------------------------------------------------------------------------------------------------------


class ManualAckClient:
    """One persistent MQTT session (MQTT 5 clean start off with the longest session expiry; 3.1.1 clean session off)
    that stays connected, with backoff, from `async with` to its end; messages are acknowledged by `settle`.

    `arrived` is set whenever messages arrive (never cleared here): pass one event to several clients to wait for
    any of them."""

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        queue_max: int,
        receive_maximum: int,
        arrived: asyncio.Event | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.arrived = arrived if arrived is not None else asyncio.Event()
        self.connected = asyncio.Event()
        self.connects = 0
        self._queue_max = queue_max
        self._receive_maximum = receive_maximum
        self._inbox: deque[InboundMessage] = deque()
        self._filters: list[str] = []
        self._connection = 0
        """Counts connections made; a token is acknowledged only while its connection is `_live`."""
        self._live: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._fd = -1
        self._reading = False
        self._dropping = False
        self._resume_due = False
        self._read_ns = 0
        self._session: contextlib.AbstractAsyncContextManager[None] | None = None
        self._connack: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[str] | None = None
        self._closed = asyncio.Event()
        self._closed.set()
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._paho = self._build()

    def _build(self) -> ChunkedReceivePaho:
        e = self.endpoint
        client = ChunkedReceivePaho(
            self._queue_max,
            CallbackAPIVersion.VERSION2,
            client_id=e.client_id,
            protocol=paho.MQTTv5 if e.mqtt5 else paho.MQTTv311,
            manual_ack=True,
            clean_session=None if e.mqtt5 else False,
            reconnect_on_failure=False,
        )
        client.username_pw_set(e.username, e.password)
        if e.ca_file:
            client.tls_set(ca_certs=e.ca_file, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        client.on_publish_packet = self._received
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    # --- lifetime ---

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        e = self.endpoint
        what = f"broker {e.host}:{e.port} as {e.client_id}"
        self._session = staying_connected(self._connect, self._serve, (MqttError,), e.reconnect_s, log, what)
        await self._session.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Leave the session: acknowledgements already asked for go out ahead of the DISCONNECT."""
        assert self._session is not None
        await self._session.__aexit__(None, None, None)
        if self._paho.socket() is not None:
            self._paho.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), DISCONNECT_GRACE_S)
        if self._paho.socket() is not None:
            log.warning("broker took no DISCONNECT in time; closing", extra={"client": self.endpoint.client_id})
            self._drop_connection()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), DISCONNECT_GRACE_S)

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[None]:
        """One connection, from the TCP connect to its loss (or the end of the session)."""
        assert self._loop is not None
        if not self._closed.is_set():  # the previous connection's socket, still being closed on the loop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), DISCONNECT_GRACE_S)
        self._connack = self._loop.create_future()
        self._lost = self._loop.create_future()
        # paho's connect blocks on DNS, TCP and the TLS handshake (bounded by its 5 s connect timeout). If the session
        # ends meanwhile, it still finishes before we go on, so that leaving never races the executor thread.
        connecting = self._loop.run_in_executor(None, self._connect_blocking)
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait({connecting}, timeout=CONNECT_TIMEOUT_S)
            raise
        except (OSError, ValueError) as exc:
            raise MqttError(f"{type(exc).__name__}: {exc}") from None
        keepalive = asyncio.create_task(self._keepalive())
        try:
            await self._answered(self._connack)
            yield
        finally:
            self._live = None
            self.connected.clear()
            keepalive.cancel()

    def _connect_blocking(self) -> None:
        e = self.endpoint
        if e.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            props.ReceiveMaximum = self._receive_maximum
            self._paho.connect(e.host, e.port, e.keepalive_s, clean_start=False, properties=props)
        else:
            self._paho.connect(e.host, e.port, e.keepalive_s)

    async def _serve(self, _: None) -> None:
        """Subscribe (again: a broker that lost its sessions has forgotten them), then wait for the connection's end."""
        assert self._lost is not None
        if self._filters:
            await self._subscribe(list(self._filters))
        reason = await self._lost
        raise MqttError(f"connection lost: {reason}")

    async def _keepalive(self) -> None:
        while self._paho.loop_misc() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            if self._fd >= 0 and _pending_socket_error(self._paho.socket()):
                self._socket_failed(self._fd, "reset")
            await asyncio.sleep(1.0)

    async def _answered(self, answer: asyncio.Future[Any]) -> Any:
        """The broker's answer (CONNACK, SUBACK), or MqttError when the connection ends or it takes too long."""
        assert self._lost is not None
        done, _ = await asyncio.wait({answer, self._lost}, timeout=CONNECT_TIMEOUT_S, return_when="FIRST_COMPLETED")
        if answer in done:
            return answer.result()
        if self._lost in done:
            raise MqttError(f"connection lost: {self._lost.result()}")
        self._drop_connection()
        raise MqttError("the broker did not answer in time")

    # --- paho's callbacks (on the loop, but for the socket opening inside the executor's connect) ---

    def _on_loop(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: Any) -> None:
        self._on_loop(self._socket_opened, sock.fileno())

    def _socket_opened(self, fd: int) -> None:
        self._fd = fd
        self._closed.clear()
        self._dropping = False
        self._reading = False
        # A new connection starts with nothing read (the old one's unparsed bytes are void) and must read its CONNACK
        # whatever the bound says; a PUBLISH without a place holds reading back again.
        self._paho.held_back = False
        self._watch_socket()

    def _on_socket_close(self, client: paho.Client, userdata: object, sock: Any) -> None:
        self._on_loop(self._socket_closed, sock.fileno())

    def _socket_closed(self, fd: int) -> None:
        assert self._loop is not None
        if fd != self._fd:
            return
        with contextlib.suppress(RuntimeError):  # uvloop: the poll handle already closed on a poll error
            if self._reading:
                self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._fd = -1
        self._reading = False
        self._closed.set()

    def _on_socket_register_write(self, client: paho.Client, userdata: object, sock: Any) -> None:
        self._on_loop(self._add_writer, sock.fileno())

    def _add_writer(self, fd: int) -> None:
        assert self._loop is not None
        if fd == self._fd:
            try:
                self._loop.add_writer(fd, self._paho.loop_write)
            except RuntimeError:
                self._socket_failed(fd, "poll handle closed")

    def _on_socket_unregister_write(self, client: paho.Client, userdata: object, sock: Any) -> None:
        self._on_loop(self._remove_writer, sock.fileno())

    def _remove_writer(self, fd: int) -> None:
        assert self._loop is not None
        if fd == self._fd:
            with contextlib.suppress(RuntimeError):  # uvloop: the poll handle already closed on a poll error
                self._loop.remove_writer(fd)

    def _socket_failed(self, fd: int, why: str) -> None:
        """The connection on `fd` failed where its watcher cannot say so: uvloop closes a socket's poll handle on a
        poll error (a connection reset, e.g. a broker killed) without calling its reader, and then refuses to watch
        the socket again ("the handler is closed"). Shut it down and let paho read it: paho meets the end of the
        stream and closes the connection as after any network failure, and the reconnect follows (seen on CI: a
        worker whose broker was SIGKILLed never noticed, and its acknowledgement raised)."""
        if fd != self._fd:
            return
        log.warning("connection failed under its watcher (%s); closing it", why,
                    extra={"client": self.endpoint.client_id})  # fmt: skip
        sock = self._paho.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._reading = False
        self._paho.loop_read()

    def _readable(self) -> None:
        client = self._paho
        self._read_ns = time.monotonic_ns()
        before = len(self._inbox)
        client.loop_read()
        sock = client.socket()
        # TLS: bytes already decrypted into the SSL object do not make the socket readable again.
        while sock is not None and not client.held_back and getattr(sock, "pending", lambda: 0)() > 0:
            if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            sock = client.socket()
        if client.held_back and not self._dropping and self._reading:
            # No place left: stop reading, and TCP pushes back on the broker.
            assert self._loop is not None
            self._loop.remove_reader(self._fd)
            self._reading = False
        if len(self._inbox) > before:
            self.arrived.set()

    def _watch_socket(self) -> None:
        assert self._loop is not None
        if self._fd >= 0 and not self._reading:
            try:
                self._loop.add_reader(self._fd, self._readable)
            except RuntimeError:
                self._socket_failed(self._fd, "poll handle closed")
                return
            self._reading = True

    def _read_again(self) -> None:
        """Places were freed: parse what is already read, then watch the socket again unless that filled them."""
        self._resume_due = False
        client = self._paho
        if not client.held_back or client.places <= 0:
            return
        before = len(self._inbox)
        self._read_ns = time.monotonic_ns()
        if client.read_buffered() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("dropping the connection: a buffered packet did not parse")
            self._drop_connection()
        if len(self._inbox) > before:
            self.arrived.set()
        if not client.held_back:
            self._watch_socket()

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if self._connack is None or self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(MqttCodeError(reason, "broker refused the connection"))
        else:
            # Here, not where the CONNACK is awaited: the PUBLISHes read with it are handled before that resumes.
            self._connection += 1
            self._live = self._connection
            self.connects += 1
            self.connected.set()
            self._connack.set_result(None)
            log.info(
                "connected to broker",
                extra={"client": self.endpoint.client_id, "connection": self._connection, "flags": str(flags)},
            )

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        self._live = None
        self.connected.clear()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(str(reason))

    def _on_subscribe(
        self, client: paho.Client, userdata: object, mid: int, reasons: list[ReasonCode], props: object
    ) -> None:
        answer = self._subacks.pop(mid, None)
        if answer is not None and not answer.done():
            answer.set_result(reasons)

    # --- messages ---

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        # Only QoS 2 still takes paho's own path; the subscriptions are QoS 1, so the broker never sends it.
        self._paho.places -= 1
        self._received(message.topic, bytes(message.payload), message.mid, message.qos)
        self.arrived.set()

    def _received(self, topic: str, payload: bytes, mid: int, qos: int) -> None:
        # `arrived` is set and the clock read once per socket read, not per message (measured per-message costs).
        self._inbox.append(InboundMessage(topic, payload, AckToken(self._connection, mid, qos), self._read_ns))

    @property
    def messages(self) -> AsyncIterator[InboundMessage]:
        """Every message, in arrival order, across reconnects."""
        return self._messages()

    async def _messages(self) -> AsyncIterator[InboundMessage]:
        while True:
            while self._inbox:
                yield self._inbox.popleft()
            self.arrived.clear()
            if not self._inbox:
                await self.arrived.wait()

    @property
    def waiting(self) -> int:
        """Messages received and not taken yet."""
        return len(self._inbox)

    def take(self, limit: int) -> list[InboundMessage]:
        """Up to `limit` of the messages waiting, without waiting."""
        inbox = self._inbox
        return [inbox.popleft() for _ in range(min(limit, len(inbox)))]

    async def batch(self, batch_max: int, window_ms: int) -> list[InboundMessage]:
        """Up to `batch_max` messages, waiting at most `window_ms` after the call for more to arrive."""
        batch = self.take(batch_max)
        deadline = time.monotonic() + window_ms / 1000
        while len(batch) < batch_max:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.arrived.clear()
            if not self._inbox:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), remaining)
            batch += self.take(batch_max - len(batch))
        return batch

    # --- acknowledging ---

    def settle(self, token: object, ack: bool = True) -> None:
        """Acknowledge (if its connection is still up) and free the message's place. Call once per message; a second
        call for the same token is refused with a warning and changes nothing.

        `ack=False` frees the place only; the broker redelivers the message after the next reconnect."""
        self.settle_all((token,), ack)

    def settle_all(self, tokens: Iterable[object], ack: bool = True) -> None:
        """`settle` for each of `tokens`, with their PUBACKs in one packet."""
        live = self._live
        mids: list[int] = []
        freed = 0
        for token in tokens:
            assert isinstance(token, AckToken)
            if token.settled:
                # A recovery path that settles a whole batch may meet messages settled before the failure: acking or
                # freeing a place twice would ack another message or overrun the bound.
                log.warning("message settled twice", extra={"message_id": token.message_id})
                continue
            token.settled = True
            freed += 1
            if ack and token.qos and token.connection == live:
                if token.qos == 1:
                    mids.append(token.message_id)
                else:
                    self._paho.ack(token.message_id, token.qos)
        if mids:
            self._paho.queue_pubacks(mids)
        if freed:
            self._free(freed)

    def _free(self, count: int) -> None:
        client = self._paho
        if client.places + count > self._queue_max:
            raise ValueError(f"freeing {count} places would exceed the bound of {self._queue_max}")
        client.places += count
        if client.held_back and not self._resume_due and self._loop is not None:
            self._resume_due = True
            self._loop.call_soon(self._read_again)

    @property
    def in_memory(self) -> int:
        """Messages delivered and not settled yet."""
        return self._queue_max - self._paho.places

    # --- sending ---

    async def subscribe(self, *filters: str) -> None:
        """Subscribe at QoS 1, now if connected and again on every later connection."""
        self._filters.extend(f for f in filters if f not in self._filters)
        if self.connected.is_set():
            await self._subscribe(list(filters))

    async def _subscribe(self, filters: list[str]) -> None:
        assert self._loop is not None
        rc, mid = self._paho.subscribe([(f, 1) for f in filters])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise MqttCodeError(rc, "could not subscribe")
        answer: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subacks[mid] = answer
        try:
            reasons = await self._answered(answer)
        finally:
            self._subacks.pop(mid, None)
        refused = [f"{f}: {r}" for f, r in zip(filters, reasons, strict=False) if r.is_failure]
        if refused:
            # Reconnecting does not change a broker's ACL: say so loudly and keep the rest of the session.
            log.error("broker refused subscriptions", extra={"refused": "; ".join(refused)})

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; paho writes it when the socket takes it and resends a QoS 1 one after a reconnect until
        the broker acknowledges it."""
        self._paho.publish(topic, payload, qos=qos, retain=retain)

    def redeliver_unacknowledged(self) -> None:
        """Drop the connection so that the broker redelivers every unacknowledged message on the resumed session."""
        self._drop_connection()

    def _drop_connection(self) -> None:
        # The reader then sees the end of the stream and paho closes the connection as after a network failure.
        sock = self._paho.socket()
        if isinstance(sock, socket.socket):  # also ssl.SSLSocket
            self._paho.loop_write()  # acknowledgements already asked for go out first, as far as the socket takes them
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            self._dropping = True  # read to the end even without a place left
            self._watch_socket()


def _pending_socket_error(sock: object) -> bool:
    """Whether the kernel holds an error for `sock` (SO_ERROR: a reset connection), which a closed watcher would
    never report. Reading SO_ERROR clears it; the caller then closes the connection."""
    if not isinstance(sock, socket.socket):
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:
        return True


__all__ = [
    "PAHO_VERSIONS",
    "READ_CHUNK",
    "AckToken",
    "BrokerEndpoint",
    "ChunkedReceivePaho",
    "ManualAckClient",
    "decode_publish",
    "paho_version",
    "split_packet",
]
