"""coordinator/ingest/paho_receive.py: the ingest's own receive path over paho-mqtt's private internals.

The pin (paho version and the private names used) fails first when paho changes; the packet functions are checked
against paho's own decoder; the client is fed real sockets in awkward splits and run against a real Mosquitto with
MQTT 5 and 3.1.1, where acknowledged messages must stay acknowledged and unacknowledged ones must come back.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from mqtt_fixtures import running_mosquitto, wait_until
from paho.mqtt import _packet
from paho.mqtt.client import _ConnectionState
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

from coordinator.ingest.mqtt import BrokerEndpoint, BrokerSession
from coordinator.ingest.paho_receive import (
    PAHO_VERSIONS,
    READ_CHUNK,
    IngestClient,
    _fresh_in_packet,
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
        f"paho-mqtt {paho_version()} is not one of {sorted(PAHO_VERSIONS)}: re-check coordinator/ingest/paho_receive.py"
        " against its client.py (_packet_read, _handle_publish, _packet_write, _packet_queue, reconnect), then add it"
    )
    for name in ("_packet_read", "_handle_publish", "_packet_handle", "_packet_write", "_packet_queue", "_sock_recv"):
        assert callable(getattr(paho.Client, name, None)), name
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="pin")
    assert client._in_packet.keys() == _fresh_in_packet().keys()
    for name in ("_sock", "_sockpairW", "_out_packet", "_msgtime_mutex", "_in_callback_mutex", "_manual_ack"):
        assert hasattr(client, name), name
    assert paho.sockpair_data == b"0"


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


def test_client_reads_packets_split_anyhow_and_leaves_other_packets_to_paho() -> None:
    rng = random.Random(5)
    messages = [
        (f"mid/m/dev/d{i % 3}/up/report", rng.randbytes(rng.choice([0, 1, 900, 70_000])), i + 1) for i in range(200)
    ]
    messages.append(("big", rng.randbytes(READ_CHUNK * 2 + 17), 201))
    # A PINGRESP between two PUBLISHes: paho's own handler must get it (it clears _ping_t).
    packets = [_publish(t, p, mid) for t, p, mid in messages]
    data = b"".join(packets[:100]) + b"\xd0\x00" + b"".join(packets[100:])
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = IngestClient(CallbackAPIVersion.VERSION2, client_id="x", protocol=paho.MQTTv5, manual_ack=True)
    client._sock = ours
    client._state = _ConnectionState.MQTT_CS_CONNECTED
    client._ping_t = 1.0  # a PINGRESP clears it: proof that paho's own handler saw the packet
    got: list[tuple[str, bytes, int, int]] = []
    client.on_received = lambda topic, payload, mid, qos: got.append((topic, payload, mid, qos))

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
    finally:
        feeder.join()
        ours.close()
        theirs.close()


# --- against Mosquitto -----------------------------------------------------------------------------------------------


class _Inbox:
    def __init__(self) -> None:
        self.messages: deque[InboundMessage] = deque()
        self.lock = threading.Lock()

    def deliver(self, message: InboundMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def take(self) -> list[InboundMessage]:
        with self.lock:
            out = list(self.messages)
            self.messages.clear()
        return out


def _session(port: int, client_id: str, inbox: _Inbox, mqtt5: bool) -> BrokerSession:
    endpoint = BrokerEndpoint("127.0.0.1", port, "ingest", "", client_id, mqtt5=mqtt5)
    session = BrokerSession(endpoint, ("t/#",), inbox.deliver, queue_max=64, receive_maximum=32)
    session.start()
    wait_until(session.connected.is_set, 30, "ingest session connected")
    return session


def _receive(
    session: BrokerSession, inbox: _Inbox, count: int, ack: bool = True, until_topic: str = ""
) -> list[InboundMessage]:
    """Settle messages as they come until `count` (not probes) arrived, or one on `until_topic`."""
    got: list[InboundMessage] = []
    done = False

    def settle_new() -> bool:
        nonlocal done
        for message in inbox.take():
            session.settle(message.token, ack=ack or message.topic.startswith("t/probe"))
            done = done or message.topic == until_topic
            if not message.topic.startswith("t/probe"):
                got.append(message)
        return done if until_topic else len(got) >= count

    wait_until(settle_new, 60, f"{count} messages through the ingest session")
    return got


@pytest.mark.parametrize("mqtt5", [True, False], ids=["mqtt5", "mqtt311"])
def test_ingest_session_receives_and_acknowledges_through_mosquitto(tmp_path: Path, mqtt5: bool) -> None:
    with running_mosquitto(tmp_path / "mosquitto") as broker:
        _receive_and_acknowledge(broker.port, mqtt5)


def _receive_and_acknowledge(port: int, mqtt5: bool) -> None:
    rng = random.Random(11)
    sent = [(f"t/d{i % 4}", rng.randbytes(rng.choice([10, 900, 70_000]))) for i in range(400)]
    sent.insert(200, ("t/big", rng.randbytes(READ_CHUNK + 1000)))
    client_id = f"ingest-{uuid.uuid4().hex[:8]}"
    inbox = _Inbox()
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{client_id}", protocol=paho.MQTTv5)
    publisher.max_inflight_messages_set(100)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    session = _session(port, client_id, inbox, mqtt5)
    try:
        _wait_subscribed(publisher, session, inbox)
        infos = [publisher.publish(topic, payload, qos=1) for topic, payload in sent]
        got = _receive(session, inbox, len(sent))
        for info in infos:
            info.wait_for_publish(30)
        assert [(m.topic, m.payload) for m in got] == sent
        # Unacknowledged: the last 5 come back on the resumed session; acknowledged ones must not.
        for i in range(5):
            publisher.publish("t/unacked", f"u{i}".encode(), qos=1).wait_for_publish(30)
        unacked = _receive(session, inbox, 5, ack=False)
        assert [m.payload for m in unacked] == [f"u{i}".encode() for i in range(5)]
    finally:
        session.stop()
    session = _session(port, client_id, inbox, mqtt5)
    try:
        publisher.publish("t/marker", b"marker", qos=1).wait_for_publish(30)
        after = _receive(session, inbox, 6)
        assert [m.payload for m in after] == [f"u{i}".encode() for i in range(5)] + [b"marker"]
    finally:
        session.stop()
        publisher.loop_stop()
        publisher.disconnect()


def _wait_subscribed(publisher: paho.Client, session: BrokerSession, inbox: _Inbox) -> None:
    """Probe until one arrives (the subscription is in place), then drain every probe."""

    def probe_arrived() -> bool:
        publisher.publish("t/probe", b"probe", qos=1).wait_for_publish(10)
        return any(m.topic == "t/probe" for m in list(inbox.messages))

    wait_until(probe_arrived, 30, "the ingest session's subscription", poll_s=0.2)
    publisher.publish("t/probe-end", b"", qos=1).wait_for_publish(10)
    _receive(session, inbox, 0, until_topic="t/probe-end")


def test_settling_a_message_twice_changes_nothing_the_second_time() -> None:
    """service._recover settles a whole failed batch, some of it possibly settled already: no second ack or slot."""
    from coordinator.ingest.mqtt import AckToken

    endpoint = BrokerEndpoint("127.0.0.1", 1, "ingest", "", "twice")
    session = BrokerSession(endpoint, ("t/#",), lambda m: None, queue_max=2, receive_maximum=2)
    acks: list[int] = []
    session._client.ack_soon_all = acks.extend  # type: ignore[method-assign]
    assert session._slots.acquire(blocking=False)
    token = AckToken(session._generation, 7, 1)
    session.settle(token)
    session.settle(token)
    session.settle(token, ack=False)
    assert acks == [7]
    assert session.in_memory == 0


def test_settling_a_batch_acks_and_frees_each_message_once() -> None:
    """settle_all (one ack request and one slot release per batch) does what settle does for each token: QoS 1 acks
    on the current connection only, every slot freed, a token settled before neither acked nor freed again."""
    from coordinator.ingest.mqtt import AckToken

    endpoint = BrokerEndpoint("127.0.0.1", 1, "ingest", "", "batch")
    session = BrokerSession(endpoint, ("t/#",), lambda m: None, queue_max=5, receive_maximum=5)
    acks: list[int] = []
    session._client.ack_soon_all = acks.extend  # type: ignore[method-assign]
    for _ in range(5):
        assert session._slots.acquire(blocking=False)
    current = session._generation
    early = AckToken(current, 1, 1)
    session.settle(early)
    batch = [
        early,
        AckToken(current, 2, 1),
        AckToken(current - 1, 3, 1),
        AckToken(current, 4, 0),
        AckToken(current, 5, 1),
    ]
    session.settle_all(batch)
    assert acks == [1, 2, 5]
    assert session.in_memory == 0
    assert all(token.settled for token in batch)
    with pytest.raises(ValueError):  # freeing a slot that was never taken would overrun the bound
        session.settle_all([AckToken(current, 6, 1)], ack=False)
