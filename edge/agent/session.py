"""The device's MQTT session: aiomqtt on the agent's event loop, kept connected by protocol.reconnect.

MQTT 5 with a persistent session (clean start off, long session expiry) so receipts published while the device is
away wait at the broker; 3.1.1 with clean session off when the broker or the config says so ("auto" falls back after
an "unsupported protocol version" refusal). TLS trusts only the CA the MID handed out at enrolment. The last will is
a heartbeat signed at connect time with status `offline`. A membership named in `[[via_hub]]` connects to a Pi hub's
Mosquitto at home instead, with the login the hub made for this device; the hub's bridge carries its topics to the
MID's broker over TLS, and everything the agent checks (receipts, checkpoints) it checks as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.agent.config import HubRoute
from edge.agent.membership import Membership
from protocol.reconnect import staying_connected
from protocol.topics import device_filters

log = logging.getLogger("midgate.agent.mqtt")

SESSION_EXPIRY_S = 30 * 24 * 3600
_UNSUPPORTED_PROTOCOL = (132, 1)  # MQTT 5 reason code, MQTT 3.1.1 CONNACK return code


@dataclass(frozen=True)
class BrokerRoute:
    """Where a membership's session connects, and as whom."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)  # never in a log line or traceback
    ca_file: Path | None
    via_hub: bool

    def __str__(self) -> str:
        return f"{self.host}:{self.port}" + (" (through a hub)" if self.via_hub else " (TLS)" if self.ca_file else "")


def broker_route(membership: Membership, hub: HubRoute | None) -> BrokerRoute:
    """The MID's broker as enrolment gave it, or the hub `[[via_hub]]` names for this MID (its password read now:
    ValueError saying what is wrong with its file)."""
    if hub is not None:
        return BrokerRoute(hub.host, hub.port, membership.device, hub.password(), None, via_hub=True)
    broker = membership.record.broker
    return BrokerRoute(broker.host, broker.port, broker.username, broker.password, membership.ca_file, via_hub=False)


class DeviceSession:
    """`async with DeviceSession(...) as session:` keeps one connection to the MID's broker, reconnecting with backoff
    (`reconnect`: first and largest delay), until the block ends.

    Messages on the device's topics go to `deliver(topic, payload)`; `on_connected()` runs after every connection is
    made and subscribed. Both run on the event loop."""

    def __init__(
        self,
        membership: Membership,
        route: BrokerRoute,
        deliver: Callable[[str, bytes], None],
        on_connected: Callable[[], None],
        will: tuple[str, bytes] | None,
        protocol: str = "auto",
        keepalive_s: int = 60,
        max_inflight: int = 100,
        reconnect: tuple[float, float] = (1.0, 120.0),
    ) -> None:
        self.membership = membership
        self.route = route
        self._deliver = deliver
        self._on_connected = on_connected
        self._will = will
        self._mode = protocol
        self._mqtt5 = protocol in ("auto", "5")
        self._keepalive = keepalive_s
        self._max_inflight = max_inflight
        self._reconnect = reconnect
        self.connected = asyncio.Event()
        self.failure = ""
        """Why the latest connection attempt failed or the connection was lost; "" while connected."""
        self._client: aiomqtt.Client | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self._session: contextlib.AbstractAsyncContextManager[None] | None = None

    async def __aenter__(self) -> Self:
        what = f"broker {self.route} of {self.membership.mid}"
        self._session = staying_connected(self._connect, self._serve, (aiomqtt.MqttError,), self._reconnect, log, what)
        await self._session.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._session is not None
        await self._session.__aexit__(exc_type, exc, tb)

    @property
    def unacked(self) -> int:
        """Publishes not yet acknowledged by the broker (paho queues beyond its in-flight window)."""
        return len(self._publishing)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Send now if connected; otherwise nothing (the outbox sends again after the next connection)."""
        client = self._client
        if client is None:
            return
        task = asyncio.create_task(self._publish(client, topic, payload, qos))
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int) -> None:
        try:
            # No timeout of its own: a lost connection cancels it (`_serve`), and the outbox resends.
            await client.publish(topic, payload, qos=qos, timeout=math.inf)
        except aiomqtt.MqttError as exc:
            log.debug("publish not acknowledged", extra={"topic": topic, "error": str(exc)})

    @contextlib.asynccontextmanager
    async def _connect(self) -> AsyncIterator[aiomqtt.Client]:
        client = self._client_for(self._mqtt5)
        connected = False
        try:
            async with client:
                connected = True
                self.failure = ""
                yield client
        except aiomqtt.MqttError as exc:
            self.failure = str(exc) or type(exc).__name__  # for `agent status` (edge.agent.daemon_status)
            refusal = exc.rc if isinstance(exc, aiomqtt.MqttCodeError) else None
            refusal = getattr(refusal, "value", refusal)
            if not connected and self._mode == "auto" and self._mqtt5 and refusal in _UNSUPPORTED_PROTOCOL:
                log.warning("broker does not speak MQTT 5; falling back to 3.1.1")
                self._mqtt5 = False
            raise

    def _client_for(self, mqtt5: bool) -> aiomqtt.Client:
        route = self.route
        will = aiomqtt.Will(self._will[0], self._will[1], qos=1, retain=False) if self._will else None
        tls = (
            aiomqtt.TLSParameters(ca_certs=str(route.ca_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
            if route.ca_file is not None
            else None
        )
        if mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            persistence: dict[str, object] = {"clean_start": False, "properties": props}
        else:
            persistence = {"clean_session": False}
        client = aiomqtt.Client(
            route.host,
            route.port,
            username=route.username,
            password=route.password,
            identifier=self.membership.device,
            protocol=aiomqtt.ProtocolVersion.V5 if mqtt5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            keepalive=self._keepalive,
            max_inflight_messages=self._max_inflight,
            tls_params=tls,
            **persistence,  # type: ignore[arg-type]
        )
        # aiomqtt warns above 10 publishes awaiting their PUBACK; the publish loop keeps up to twice the window.
        client.pending_calls_threshold = 2 * self._max_inflight + 10
        return client

    async def _serve(self, client: aiomqtt.Client) -> None:
        m = self.membership
        await client.subscribe([(f, 1) for f in device_filters(m.mid, m.device)])
        self._client = client
        self.connected.set()
        try:
            self._on_connected()
            async for message in client.messages:
                self._deliver(message.topic.value, message.payload)
        finally:
            self._client = None
            self.connected.clear()
            for task in self._publishing:
                task.cancel()
