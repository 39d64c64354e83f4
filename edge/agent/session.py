"""The device's MQTT session: paho-mqtt 2.x on its own network thread, owned by `DeviceSession`.

MQTT 5 with a persistent session (clean_start off, long session expiry) so receipts published while the device is
away wait at the broker; 3.1.1 with clean_session off when the broker or the config says so ("auto" falls back after
an "unsupported protocol version" refusal). TLS trusts only the CA the MID handed out at enrolment. The last will is
a heartbeat signed at connect time with status `offline`.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.agent.membership import Membership
from protocol.topics import device_filters

log = logging.getLogger("midgate.agent.mqtt")

SESSION_EXPIRY_S = 30 * 24 * 3600
_UNSUPPORTED_PROTOCOL = (132, 1)  # MQTT 5 reason code, MQTT 3.1.1 CONNACK return code


class DeviceSession:
    def __init__(
        self,
        membership: Membership,
        deliver: Callable[[str, bytes], None],
        on_connected: Callable[[], None],
        will: tuple[str, bytes] | None,
        protocol: str = "auto",
        keepalive_s: int = 60,
        max_inflight: int = 100,
        reconnect: tuple[float, float] = (1.0, 120.0),
    ) -> None:
        self.membership = membership
        self._deliver = deliver
        self._on_connected = on_connected
        self._will = will
        self._mode = protocol
        self._mqtt5 = protocol in ("auto", "5")
        self._keepalive = keepalive_s
        self._max_inflight = max_inflight
        self._reconnect = reconnect
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._unacked = 0
        self._client = self._build()

    def _build(self) -> paho.Client:
        m = self.membership
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=m.device,
            protocol=paho.MQTTv5 if self._mqtt5 else paho.MQTTv311,
            clean_session=None if self._mqtt5 else False,
        )
        client.username_pw_set(m.record.broker.username, m.record.broker.password)
        if m.ca_file is not None:
            client.tls_set(ca_certs=str(m.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self._will is not None:
            client.will_set(self._will[0], self._will[1], qos=1, retain=False)
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(0)
        lo, hi = self._reconnect
        client.reconnect_delay_set(max(1, int(lo)), max(1, int(hi)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def start(self) -> None:
        broker = self.membership.record.broker
        if self._mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            self._client.connect_async(broker.host, broker.port, self._keepalive, clean_start=False, properties=props)
        else:
            self._client.connect_async(broker.host, broker.port, self._keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def abort(self) -> None:
        """Drop the connection without DISCONNECT, so the broker publishes the last will (tests, shutdown on crash)."""
        self._client.loop_stop()
        sock = self._client.socket()
        if sock is not None:
            sock.close()
        self.connected.clear()

    @property
    def unacked(self) -> int:
        """QoS 1 publishes handed to paho and not yet PUBACKed (paho queues beyond its in-flight window)."""
        return self._unacked

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> bool:
        info = self._client.publish(topic, payload, qos=qos)
        if info.rc != paho.MQTT_ERR_SUCCESS and info.rc != paho.MQTT_ERR_NO_CONN:
            return False
        with self._lock:
            self._unacked += 1
        return True

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            if self._mode == "auto" and self._mqtt5 and reason.value in _UNSUPPORTED_PROTOCOL:
                log.warning("broker does not speak MQTT 5; falling back to 3.1.1")
                self._mqtt5 = False
                threading.Thread(target=self._rebuild, name="mqtt-fallback", daemon=True).start()
            else:
                log.warning("broker refused the connection: %s", reason)
            return
        m = self.membership
        for topic_filter in device_filters(m.mid, m.device):
            client.subscribe(topic_filter, qos=1)
        with self._lock:
            self._unacked = 0
        self.connected.set()
        self._on_connected()

    def _rebuild(self) -> None:
        self._client.loop_stop()
        self._client = self._build()
        self.start()

    def _on_disconnect(
        self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object
    ) -> None:
        self.connected.clear()

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        self._deliver(message.topic, bytes(message.payload))

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: ReasonCode, props: object) -> None:
        with self._lock:
            self._unacked = max(0, self._unacked - 1)
