"""A paho-mqtt client with a receive path built for one high-rate QoS 1 subscriber: the coordinator's ingest.

Measured on paho-mqtt 2.2.0 (bench/ingest_bench.py, py-spy): paho's receive costs about a third of a raw Ed25519
verification per message, and the ingest target leaves room for little besides the verification. paho reads each
packet with separate `recv` calls (one byte of command, one per length byte, then the body), takes one `select` per
packet, builds a `Properties` object and an `MQTTMessage` (which owns a `threading.Condition`) for every PUBLISH,
and matches the topic against the per-filter callbacks even when none are set. `IngestClient` instead

- reads the socket in chunks of up to `READ_CHUNK` bytes and hands every complete packet of a chunk to paho's own
  `_packet_handle` (CONNACK, SUBACK, PINGRESP, DISCONNECT, ... stay paho's code);
- decodes a QoS 0/1 PUBLISH itself (topic, packet id, MQTT 5 properties skipped) and calls `on_received(topic,
  payload, mid, qos)` directly; QoS 2 and clients without `on_received` keep paho's own path;
- writes the PUBACKs asked for (`ack_soon`, from any thread) as one packet when paho's thread next runs: one
  wake-up of that thread and one `send` per settled batch instead of one each (paho's `ack` wakes it per message).

This overrides private methods (`_packet_read`, `_handle_publish`) and uses private state (`_sock`, `_in_packet`,
`_packet_queue`, `_msgtime_mutex`, ...). It is pinned to the paho-mqtt versions in `PAHO_VERSIONS`;
tests/test_ingest_paho_receive.py fails when paho's version or the internals used here change, and checks the
client against a real Mosquitto (MQTT 5 and 3.1.1, packets split across chunks, acknowledgements honoured).

MQTT 5 PUBLISH properties are skipped, not parsed: ingest reads none of them, and the broker sends no topic alias
because the client's CONNECT announces a Topic Alias Maximum of 0 (paho's default; MQTT 5 §3.1.2.11.5).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt import __version__ as _paho_version
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.exception import MalformedPacket

log = logging.getLogger("midgate.ingest.mqtt")

PAHO_VERSIONS = frozenset({"2.2.0"})
"""The paho-mqtt versions whose private receive path this module was checked against."""
READ_CHUNK = 256 * 1024
"""Bytes asked of the socket per read: a few hundred reports; more only sits in our buffer instead of the kernel's."""
_PUBLISH = 0x30
_PUBACK = 0x40
_PUBACK_HEADER = struct.Struct("!BBH")

OnReceived = Callable[[str, bytes, int, int], None]
"""(topic, payload, packet id, qos) of one PUBLISH; called on paho's network thread."""


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


class IngestClient(paho.Client):
    """`paho.Client` with chunked reads, a direct QoS 0/1 PUBLISH callback (`on_received`) and batched PUBACKs.

    Everything else (connect, subscribe, publish, keepalive, reconnect, TLS) is paho's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_received: OnReceived | None = None
        self._chunk = bytearray()
        self._chunk_sock: object = None
        self._acks: list[int] = []
        self._acks_lock = threading.Lock()

    def ack_soon(self, mid: int) -> None:
        """PUBACK for QoS 1 packet `mid` (manual-ack mode, like `ack(mid, 1)`), written by paho's thread together with
        every other PUBACK asked for until it runs: one wake-up and one `send` per settled batch, not per message."""
        self.ack_soon_all((mid,))

    def ack_soon_all(self, mids: Sequence[int]) -> None:
        """`ack_soon` for each of `mids`, under one lock and at most one wake-up of paho's thread."""
        if not mids:
            return
        with self._acks_lock:
            first = not self._acks
            self._acks.extend(mids)
        if first:
            self._wake_network_thread()

    def _wake_network_thread(self) -> None:
        # paho's own wake-up from `_packet_queue`: one byte on its socket pair breaks its select, and it then writes.
        if self._sockpairW is not None:
            with contextlib.suppress(BlockingIOError):
                self._sockpairW.send(paho.sockpair_data)

    def _queue_acks(self) -> None:
        """Move the PUBACKs asked for into paho's out queue as one packet (under the lock, so that a `disconnect`
        from another thread queues its DISCONNECT behind every ack asked for before it)."""
        with self._acks_lock:
            acks, self._acks = self._acks, []
            if acks:
                packet = b"".join([_PUBACK_HEADER.pack(_PUBACK, 2, mid) for mid in acks])
                self._out_packet.append(
                    {
                        "command": _PUBACK,
                        "mid": 0,
                        "qos": 0,
                        "pos": 0,
                        "to_process": len(packet),
                        "packet": packet,
                        "info": None,
                    }
                )

    def _packet_write(self) -> MQTTErrorCode:
        self._queue_acks()
        return super()._packet_write()

    def disconnect(self, *args: Any, **kwargs: Any) -> MQTTErrorCode:
        # Acks asked for but not written yet go out ahead of the DISCONNECT: paho closes the socket once that is
        # written, so acks queued behind it were dropped (a stopping worker's last commits left unacknowledged).
        self._queue_acks()
        return super().disconnect(*args, **kwargs)

    def reconnect(self) -> MQTTErrorCode:
        # Packet ids name messages of one connection only; paho drops its queued packets here too.
        with self._acks_lock:
            self._acks = []
        return super().reconnect()

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
        buf = self._chunk
        buf += data
        start = 0
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        try:
            while rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                found = split_packet(buf, start)
                if found is None:
                    break
                command, body_start, body_end = found
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

    def _handle_publish(self) -> MQTTErrorCode:
        command = self._in_packet["command"]
        on_received = self.on_received
        if on_received is None or command & 0x06 == 0x04:  # QoS 2 keeps paho's state machine
            return super()._handle_publish()
        topic, payload, mid, qos = decode_publish(command, self._in_packet["packet"], self._protocol == paho.MQTTv5)
        with self._in_callback_mutex:
            try:
                on_received(topic, payload, mid, qos)
            except Exception as err:
                self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_received: %s", err)
                if not self.suppress_exceptions:
                    raise
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def paho_version() -> str:
    return str(_paho_version)


__all__ = [
    "PAHO_VERSIONS",
    "READ_CHUNK",
    "IngestClient",
    "OnReceived",
    "decode_publish",
    "paho_version",
    "split_packet",
]
