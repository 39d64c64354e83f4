"""MQTT 3.1.1 end to end: an agent on `mqtt_protocol = "auto"` falls back when the broker refuses MQTT 5, and the
coordinator runs with `[broker] mqtt5 = false`.

Mosquitto cannot turn MQTT 5 off for a listener, so a 3.1.1-only broker is made from a real Mosquitto behind a small
real TCP gateway: it reads each connection's CONNECT, answers protocol level 5 the way a 3.1.1 broker must (CONNACK
return code 0x01, "unacceptable protocol version", then close; MQTT 3.1.1 section 3.1.2.2) and pipes every other
connection byte for byte to Mosquitto. Agents and coordinator are pointed at the gateway only.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading

import pytest
from mqtt_fixtures import MessagingStack, coordinator_toml, free_port, wait_until, write_bodies

from protocol.envelope import peek_envelope

pytest_plugins = ["mqtt_fixtures"]

REPORTS = 300
MQTT5_LEVEL = 5
MQTT311_LEVEL = 4


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed mid-packet")
        data += chunk
    return data


def _read_packet(sock: socket.socket) -> tuple[bytes, int]:
    """One MQTT control packet (fixed header byte, variable-length remaining length, body) and its header length."""
    header = _read_exact(sock, 1)
    length_bytes = b""
    length, shift = 0, 0
    while True:
        b = _read_exact(sock, 1)
        length_bytes += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    return header + length_bytes + _read_exact(sock, length), len(header + length_bytes)


class Mqtt311Gateway:
    """A listening socket on a free port that refuses MQTT 5 CONNECTs and relays 3.1.1 sessions to `upstream`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.levels: list[tuple[int, bytes]] = []  # (protocol level, client id) of every CONNECT seen
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._thread = threading.Thread(target=self._accept, name="mqtt311-gateway", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            with self._lock:
                self._sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            packet, header_len = _read_packet(conn)
            body = packet[header_len:]
            # CONNECT variable header: protocol name (2-byte length + "MQTT"), then the protocol level byte.
            level = body[6]
            # Payload starts after level(1) + flags(1) + keepalive(2) [+ properties in v5]; client id only for v3.
            client_id = body[12 : 12 + int.from_bytes(body[10:12], "big")] if level != MQTT5_LEVEL else b""
            with self._lock:
                self.levels.append((level, client_id))
            if level == MQTT5_LEVEL:
                conn.sendall(b"\x20\x02\x00\x01")
                conn.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._sockets.append(upstream)
            upstream.sendall(packet)
            threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
            self._pipe(conn, upstream)
        except (OSError, ConnectionError, IndexError):
            conn.close()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()
        self._thread.join(timeout=5)


def test_gateway_refuses_mqtt5_like_a_311_broker_and_relays_311(mosquitto: object) -> None:
    """The gateway itself, with plain paho clients: v5 gets 'Unsupported protocol version', 3.1.1 reaches Mosquitto."""
    import paho.mqtt.client as paho
    from mqtt_fixtures import MosquittoProcess
    from paho.mqtt.enums import CallbackAPIVersion

    assert isinstance(mosquitto, MosquittoProcess)
    gateway = Mqtt311Gateway(mosquitto.port)
    try:
        results: dict[str, list[str]] = {"v5": [], "v311": []}
        for name, protocol in (("v5", paho.MQTTv5), ("v311", paho.MQTTv311)):
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{name}", protocol=protocol)
            client.on_connect = lambda c, u, f, rc, p, name=name: results[name].append(str(rc))
            client.connect("127.0.0.1", gateway.port)
            client.loop_start()
            try:
                wait_until(lambda name=name: bool(results[name]), 10, f"CONNACK for {name}")
            finally:
                client.disconnect()
                client.loop_stop()
        assert results["v5"] == ["Unsupported protocol version"]
        assert results["v311"] == ["Success"]
        assert "as probe-v311 (p2, c1" in mosquitto.log_text()
        assert "probe-v5" not in mosquitto.log_text()
    finally:
        gateway.close()


@pytest.mark.slow
def test_agent_falls_back_to_311_and_coordinator_runs_on_311(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    broker = stack.start_broker()
    gateway = Mqtt311Gateway(broker.port)
    try:
        # Coordinator and devices see only the gateway; the coordinator is configured for 3.1.1.
        stack.config.write_text(
            coordinator_toml(stack.data_dir, stack.mid, gateway.port, stack.http_port, broker_extra="mqtt5 = false")
        )
        stack.start_coordinator()
        agents = [stack.enrol_agent(n) for n in ("ana", "ben")]  # mqtt_protocol defaults to "auto"
        for a in agents:
            stack.take_invitation(a)
        written = write_bodies(agents, REPORTS)
        for a in agents:
            stack.start_agent(a)

        def done() -> bool:
            return all(a.spool_left() == 0 and a.outbox_counts() == (0, len(written[a.device])) for a in agents)

        wait_until(done, 90, "every report receipted through the 3.1.1 gateway", poll_s=0.2)
        leaves = stack.ledger_contributions()
        assert len(leaves) == REPORTS
        assert {json.loads(peek_envelope(env)[1])["update_sha256"] for _, _, env in leaves} == set().union(
            *written.values()
        )

        for a in agents:
            assert (MQTT311_LEVEL, a.device.encode()) in gateway.levels, f"{a.name} never connected with 3.1.1"
            assert a.process is not None
            assert "falling back to 3.1.1" in a.process.log_text()
        assert any(level == MQTT5_LEVEL for level, _ in gateway.levels), "no agent tried MQTT 5 first"
        # The coordinator asked for 3.1.1 straight away; Mosquitto (which logs 3.1.1 as p2) saw no MQTT 5 session.
        log = broker.log_text()
        assert "as midgate-coordinator (p2, c0" in log
        assert "(p5," not in log
    finally:
        gateway.close()
