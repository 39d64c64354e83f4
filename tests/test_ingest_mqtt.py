"""coordinator/ingest/mqtt.py: the ingest's MQTT client and its own receive path over paho-mqtt's private internals.

The pin (paho version and the private names used) fails first when paho changes; the packet functions are checked
against paho's own decoder; the receive path is fed real sockets in awkward splits; the client runs against a real
Mosquitto with MQTT 5 and 3.1.1, where acknowledged messages must stay acknowledged, unacknowledged ones must come
back, and no more than `queue_max` unacknowledged messages are ever held however many the broker has.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from mqtt_fixtures import running_mosquitto
from paho.mqtt import _packet
from paho.mqtt.client import _ConnectionState
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

from coordinator.ingest.mqtt import (
    PAHO_VERSIONS,
    READ_CHUNK,
    AckToken,
    BrokerEndpoint,
    ChunkedReceivePaho,
    ManualAckClient,
    _fresh_in_packet,
    _pending_socket_error,
    decode_publish,
    paho_version,
    split_packet,
)
from coordinator.ingest.pipeline import InboundMessage


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _publish(topic: str, payload: bytes, mid: int, qos: int = 1, mqtt5: bool = True, props: bytes = b"") -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t
    if qos:
        body += struct.pack("!H", mid)
    if mqtt5:
        body += _varint(len(props)) + props
    return bytes([0x30 | (qos << 1)]) + _varint(len(body) + len(payload)) + body + payload


# --- the pin -------------------------------------------------------------------------------------------------------


def test_paho_version_and_private_internals_are_the_ones_checked() -> None:
    assert paho_version() in PAHO_VERSIONS, (
        f"paho-mqtt {paho_version()} is not one of {sorted(PAHO_VERSIONS)}: re-check ChunkedReceivePaho in"
        " coordinator/ingest/mqtt.py against paho's client.py (_packet_read, _packet_handle, _packet_queue,"
        " _sock_recv, reconnect), then add it"
    )
    for name in ("_packet_read", "_packet_handle", "_packet_queue", "_sock_recv", "_easy_log"):
        assert callable(getattr(paho.Client, name, None)), name
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="pin")
    assert client._in_packet.keys() == _fresh_in_packet().keys()
    for name in ("_sock", "_msgtime_mutex", "_last_bytes_received", "_protocol"):
        assert hasattr(client, name), name
    assert callable(paho.time_func)


# --- packet functions ------------------------------------------------------------------------------------------------


def test_split_packet_waits_for_the_whole_packet_and_refuses_a_five_byte_length() -> None:
    packet = _publish("mid/m/dev/d/up/report", b"x" * 300, 7)
    for cut in range(len(packet)):
        assert split_packet(packet[:cut], 0) is None, cut
    command, _start, end = split_packet(packet + b"\x30", 0)  # type: ignore[misc]
    assert (command, end) == (packet[0], len(packet))
    with pytest.raises(MalformedPacket):
        split_packet(b"\x30\x80\x80\x80\x80\x01" + b"\x00" * 10, 0)


@pytest.mark.parametrize("mqtt5", [True, False])
@pytest.mark.parametrize("qos", [0, 1])
def test_decode_publish_agrees_with_paho(mqtt5: bool, qos: int) -> None:
    protocol = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
    # A subscription identifier and a user property: skipped by us, parsed by paho, payload must agree.
    props = b"\x0b\x05" + b"\x26\x00\x01k\x00\x01v" if mqtt5 else b""
    for topic, payload in [("mid/m/dev/d/up/report", b'{"a":1}'), ("t/\u00e9", b""), ("x", bytes(range(256)) * 300)]:
        packet = _publish(topic, payload, 513, qos, mqtt5, props)
        command, start, end = split_packet(packet, 0)  # type: ignore[misc]
        theirs = _packet.decode_publish(command, bytearray(packet[start:end]), protocol)
        assert decode_publish(command, bytearray(packet[start:end]), mqtt5) == (
            theirs.topic.decode(),
            bytes(theirs.payload),
            theirs.mid,
            theirs.qos,
        )


def test_decode_publish_refuses_truncated_or_non_utf8() -> None:
    body = _publish("abc", b"payload", 9)[2:]
    for bad in [b"\x00", b"\x00\x09abc", b"\x00\x03abc\x00", b"\x00\x03abc\x00\x09", b"\x00\x03abc\x00\x09\x05\x00"]:
        with pytest.raises(MalformedPacket):
            decode_publish(0x32, bytearray(bad), True)
    with pytest.raises(MalformedPacket):
        decode_publish(0x32, bytearray(b"\x00\x02\xc3\x28\x00\x01\x00"), True)
    assert decode_publish(0x32, bytearray(body), True) == ("abc", b"payload", 9, 1)


# --- the client on a real socket -------------------------------------------------------------------------------------


def _socket_client(places: int, got: list[tuple[str, bytes, int, int]]) -> tuple[ChunkedReceivePaho, socket.socket]:
    """A receive path reading one end of a socket pair, as if connected; returns it and the broker's end."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = ChunkedReceivePaho(places, CallbackAPIVersion.VERSION2, client_id="x", protocol=paho.MQTTv5)
    client._sock = ours
    client._state = _ConnectionState.MQTT_CS_CONNECTED
    client.on_publish_packet = lambda topic, payload, mid, qos: got.append((topic, payload, mid, qos))
    return client, theirs


def test_receive_path_reads_packets_split_anyhow_and_leaves_other_packets_to_paho() -> None:
    rng = random.Random(5)
    messages = [
        (f"mid/m/dev/d{i % 3}/up/report", rng.randbytes(rng.choice([0, 1, 900, 70_000])), i + 1) for i in range(200)
    ]
    messages.append(("big", rng.randbytes(READ_CHUNK * 2 + 17), 201))
    # A PINGRESP between two PUBLISHes: paho's own handler must get it (it clears _ping_t).
    packets = [_publish(t, p, mid) for t, p, mid in messages]
    data = b"".join(packets[:100]) + b"\xd0\x00" + b"".join(packets[100:])
    got: list[tuple[str, bytes, int, int]] = []
    client, theirs = _socket_client(len(messages), got)
    client._ping_t = 1.0  # a PINGRESP clears it: proof that paho's own handler saw the packet

    def feed() -> None:
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 7, 500, 4096, 100_000])
            theirs.sendall(data[pos : pos + step])
            pos += step

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        deadline = time.monotonic() + 60
        while len(got) < len(messages) and time.monotonic() < deadline:
            rc = client.loop_read()
            assert rc == 0, rc
        assert got == [(t, p, mid, 1) for t, p, mid in messages]
        assert client._ping_t == 0
        assert client.places == 0
    finally:
        feeder.join()
        client._sock.close()  # type: ignore[union-attr]
        theirs.close()


def test_receive_path_holds_back_without_a_place_and_resumes_from_what_it_read() -> None:
    messages = [(f"t/{i}", f"m{i}".encode(), i + 1) for i in range(30)]
    got: list[tuple[str, bytes, int, int]] = []
    client, theirs = _socket_client(10, got)
    try:
        theirs.sendall(b"".join(_publish(t, p, mid) for t, p, mid in messages))
        assert client.loop_read() == 0
        assert len(got) == 10 and client.held_back
        assert client.loop_read() == 0  # more reads while held back deliver nothing
        assert len(got) == 10
        client.places += 15
        assert client.read_buffered() == 0
        assert len(got) == 25 and client.held_back
        client.places += 100
        assert client.read_buffered() == 0
        assert got == [(t, p, mid, 1) for t, p, mid in messages]
        assert not client.held_back
    finally:
        client._sock.close()  # type: ignore[union-attr]
        theirs.close()


# --- against Mosquitto -----------------------------------------------------------------------------------------------


def _endpoint(port: int, client_id: str, mqtt5: bool = True) -> BrokerEndpoint:
    return BrokerEndpoint("127.0.0.1", port, "ingest", "", client_id, mqtt5=mqtt5, reconnect_s=(0.1, 0.5))


def _publisher(port: int, client_id: str) -> paho.Client:
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{client_id}", protocol=paho.MQTTv5)
    publisher.max_inflight_messages_set(100)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    return publisher


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 120))


async def _receive(
    client: ManualAckClient, count: int, ack: bool = True, until_topic: str = ""
) -> list[InboundMessage]:
    """Settle messages as they come until `count` (not probes) arrived, or one on `until_topic`."""
    got: list[InboundMessage] = []
    if not until_topic and count == 0:
        return got
    async for message in client.messages:
        probe = message.topic.startswith("t/probe")
        client.settle(message.token, ack=ack or probe)
        if not probe:
            got.append(message)
        if message.topic == until_topic if until_topic else len(got) >= count:
            break
    return got


async def _wait_subscribed(publisher: paho.Client, client: ManualAckClient) -> None:
    """Probe until one arrives (the subscription is in place), then drain every probe."""
    await client.connected.wait()
    while True:
        await asyncio.to_thread(lambda: publisher.publish("t/probe", b"probe", qos=1).wait_for_publish(10))
        await asyncio.sleep(0.2)
        if client.waiting:
            break
    await asyncio.to_thread(lambda: publisher.publish("t/probe-end", b"", qos=1).wait_for_publish(10))
    await _receive(client, 0, until_topic="t/probe-end")


@pytest.mark.parametrize("mqtt5", [True, False], ids=["mqtt5", "mqtt311"])
def test_client_receives_and_acknowledges_through_mosquitto(tmp_path: Path, mqtt5: bool) -> None:
    with running_mosquitto(tmp_path / "mosquitto") as broker:
        _run(lambda: _receive_and_acknowledge(broker.port, mqtt5))


async def _receive_and_acknowledge(port: int, mqtt5: bool) -> None:
    rng = random.Random(11)
    sent = [(f"t/d{i % 4}", rng.randbytes(rng.choice([10, 900, 70_000]))) for i in range(400)]
    sent.insert(200, ("t/big", rng.randbytes(READ_CHUNK + 1000)))
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    publisher = _publisher(port, client_id)
    try:
        async with ManualAckClient(_endpoint(port, client_id, mqtt5), queue_max=64, receive_maximum=32) as client:
            await client.subscribe("t/#")
            await _wait_subscribed(publisher, client)
            infos = [publisher.publish(topic, payload, qos=1) for topic, payload in sent]
            got = await _receive(client, len(sent))
            for info in infos:
                await asyncio.to_thread(info.wait_for_publish, 30)
            assert [(m.topic, m.payload) for m in got] == sent
            # Unacknowledged: the last 5 come back on the resumed session; acknowledged ones must not.
            for i in range(5):
                await asyncio.to_thread(publisher.publish("t/unacked", f"u{i}".encode(), qos=1).wait_for_publish, 30)
            unacked = await _receive(client, 5, ack=False)
            assert [m.payload for m in unacked] == [f"u{i}".encode() for i in range(5)]
            assert client.in_memory == 0
        async with ManualAckClient(_endpoint(port, client_id, mqtt5), queue_max=64, receive_maximum=32) as client:
            await client.subscribe("t/#")
            await client.connected.wait()
            await asyncio.to_thread(publisher.publish("t/marker", b"marker", qos=1).wait_for_publish, 30)
            after = await _receive(client, 6)
            assert [m.payload for m in after] == [f"u{i}".encode() for i in range(5)] + [b"marker"]
    finally:
        publisher.loop_stop()
        publisher.disconnect()


def test_client_holds_no_more_than_queue_max_and_takes_the_rest_as_places_free(tmp_path: Path) -> None:
    """Mosquitto was seen exceeding the Receive Maximum a client advertises: the bound is the client's own."""
    with running_mosquitto(tmp_path / "mosquitto") as broker:
        _run(lambda: _bounded(broker.port))


@contextlib.asynccontextmanager
async def _subscribed(
    port: int, queue_max: int, receive_maximum: int
) -> AsyncIterator[tuple[paho.Client, ManualAckClient]]:
    """A publisher and a client subscribed to `t/#` (probes drained), both closed on exit."""
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    publisher = _publisher(port, client_id)
    try:
        async with ManualAckClient(_endpoint(port, client_id), queue_max, receive_maximum) as client:
            await client.subscribe("t/#")
            await _wait_subscribed(publisher, client)
            yield publisher, client
    finally:
        publisher.loop_stop()
        publisher.disconnect()


async def _bounded(port: int) -> None:
    async with _subscribed(port, queue_max=5, receive_maximum=1000) as (publisher, client):
        infos = [publisher.publish("t/m", f"{i}".encode(), qos=1) for i in range(300)]
        for info in infos:  # all of them are at the broker, which may send up to 1000 unacknowledged
            await asyncio.to_thread(info.wait_for_publish, 30)
        held = await client.batch(300, 500)
        assert len(held) == 5 and client.in_memory == 5
        await asyncio.sleep(0.3)
        assert client.waiting == 0, "a message arrived without a free place"
        got = [m.payload for m in held]
        client.settle_all([m.token for m in held])
        while len(got) < 300:
            batch = await client.batch(300, 50)
            assert client.in_memory <= 5
            got += [m.payload for m in batch]
            client.settle_all([m.token for m in batch])
        assert got == [f"{i}".encode() for i in range(300)]


def test_a_dropped_connection_is_made_again_and_redelivers_what_was_not_acknowledged(tmp_path: Path) -> None:
    with running_mosquitto(tmp_path / "mosquitto") as broker:
        _run(lambda: _dropped(broker.port))


async def _dropped(port: int) -> None:
    async with _subscribed(port, queue_max=50, receive_maximum=50) as (publisher, client):
        for i in range(10):
            await asyncio.to_thread(publisher.publish("t/m", f"{i}".encode(), qos=1).wait_for_publish, 30)
        first: list[InboundMessage] = []
        while len(first) < 10:
            first += await client.batch(10 - len(first), 100)
        client.settle_all([m.token for m in first[:4]])  # acknowledged now, on the live connection
        client.settle_all([m.token for m in first[4:]], ack=False)
        assert client.connects == 1
        client.redeliver_unacknowledged()
        again = await _receive(client, 6)
        assert [m.payload for m in again] == [f"{i}".encode() for i in range(4, 10)]
        assert client.connects == 2


# --- acknowledging ---------------------------------------------------------------------------------------------------


def _offline_client(queue_max: int) -> tuple[ManualAckClient, list[int]]:
    """A client whose connection 1 is up (no socket: PUBACK requests are recorded) and whose places are all taken."""
    client = ManualAckClient(_endpoint(1, "offline"), queue_max=queue_max, receive_maximum=queue_max)
    acks: list[int] = []
    client._paho.queue_pubacks = acks.extend  # type: ignore[method-assign]
    client._live = 1
    client._paho.places = 0
    return client, acks


def test_settling_a_message_twice_changes_nothing_the_second_time() -> None:
    """service._recover settles a whole failed batch, some of it possibly settled already: no second ack or place."""
    client, acks = _offline_client(1)
    token = AckToken(1, 7, 1)
    client.settle(token)
    client.settle(token)
    client.settle(token, ack=False)
    assert acks == [7]
    assert client.in_memory == 0


def test_settling_a_batch_acks_and_frees_each_message_once() -> None:
    """settle_all (one PUBACK packet per batch) does what settle does for each token: QoS 1 acks on the live
    connection only, every place freed, a token settled before neither acked nor freed again."""
    client, acks = _offline_client(5)
    early = AckToken(1, 1, 1)
    client.settle(early)
    batch = [early, AckToken(1, 2, 1), AckToken(0, 3, 1), AckToken(1, 4, 0), AckToken(1, 5, 1)]
    client.settle_all(batch)
    assert acks == [1, 2, 5]
    assert client.in_memory == 0
    assert all(token.settled for token in batch)
    with pytest.raises(ValueError):  # freeing a place that was never taken would overrun the bound
        client.settle_all([AckToken(1, 6, 1)], ack=False)
    client._live = None  # between connections nothing is acknowledged
    client._paho.places = 0
    client.settle(AckToken(1, 8, 1))
    assert acks == [1, 2, 5]


def test_a_reset_connection_is_seen_as_a_pending_socket_error() -> None:
    """The keepalive's look for a connection uvloop stopped watching (its poll handle closed on the error): a peer's
    reset leaves SO_ERROR set on the socket; a healthy or half-closed one has none."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        try:
            assert not _pending_socket_error(client)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.close()  # linger 0: the close sends a reset
            deadline = time.monotonic() + 5.0
            while not _pending_socket_error(client) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert time.monotonic() < deadline, "the reset never showed as a socket error"
        finally:
            client.close()
            peer.close()
    assert not _pending_socket_error(None)  # no socket (between connections): nothing to look at
