"""A small sensor of the home read through the hub's Mosquitto: a subscription to the one topic the sensor publishes
its readings on (edge.sensors.hub_reading turns each message into a sample or a refusal).

One topic is one sensor: a topic filter with wildcards would interleave two devices' readings in one series, and a
training window cut across them would mix two homes' rooms. The client is aiomqtt, as the agent's own session
(edge/agent/session.py), kept connected by protocol.reconnect: a broker that goes away (Mosquitto restarted, the hub
rebooting its network) is reconnected with backoff and jitter, and each lost connection is counted in the sensor's
health. MQTT 3.1.1 with a clean session: any Mosquitto speaks it, and readings sent while the agent was away are not
worth a persistent session (a sensor sends the next one within its period).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiomqtt

from edge.sensors.hub_reading import ReadingRejectedError, ReadingShape, RejectReason, parse_reading
from edge.sensors.sample import ChannelSpec, Sample
from protocol.reconnect import stay_connected

log = logging.getLogger("midgate.sensors.mqtt")

BROKER_LOST = "broker_lost"
"""The reason counted when the connection to the hub's broker fails or is lost."""


INCOMING_BOUND = 1000
"""Messages held while the store is behind; beyond it aiomqtt drops new ones, so a sensor flooding the hub costs
bounded memory (the sample queue behind it is bounded too)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MqttSensor:
    """Parameters: name, the broker's `host` and `port`, the `topic` the sensor publishes on, the reading `shape`,
    `source` (the kind of sensor, which tasks match), `period_ms` (how often it publishes), `username` and
    `password` of the agent's login on the broker (None: anonymous), `reconnect` (first and largest delay, s)."""

    class_names: tuple[str, ...] = ()  # unlabelled

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        topic: str,
        shape: ReadingShape,
        source: str,
        period_ms: float,
        username: str | None = None,
        password: str | None = None,
        reconnect: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.topic = topic
        self.shape = shape
        self.source = source
        self.period_ms = period_ms
        self.username = username
        self.password = password
        self.reconnect = reconnect
        self.channels: tuple[ChannelSpec, ...] = shape.channels
        self._last_t_ms: int | None = None

    def reading(self, payload: bytes, *, retained: bool, received_ms: int) -> Sample:
        """The sample one message carries; raises ReadingRejectedError. A retained message is refused: the broker
        hands it over again at every subscription, an old reading that would be stored once more each time; and with
        the sensor's own time, a reading not later than the last one taken (a QoS 1 duplicate) is refused."""
        if retained:
            raise ReadingRejectedError(RejectReason.RETAINED, "retained message (an old reading)", topic=self.topic)
        sample = parse_reading(self.name, payload, self.shape, received_ms)
        if self.shape.time_path and self._last_t_ms is not None and sample.t_ms <= self._last_t_ms:
            raise ReadingRejectedError(
                RejectReason.OUT_OF_ORDER, "reading not later than the last", t_ms=sample.t_ms, last_ms=self._last_t_ms
            )
        self._last_t_ms = sample.t_ms
        return sample

    async def receive(self, deliver: Callable[[Sample], Awaitable[None]], reject: Callable[[str, str], None]) -> None:
        async def serve(client: aiomqtt.Client) -> None:
            await client.subscribe(self.topic, qos=1)
            log.info("sensor %s subscribed to %s on %s:%d", self.name, self.topic, self.host, self.port)
            async for message in client.messages:
                payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                try:
                    sample = self.reading(bytes(payload), retained=message.retain, received_ms=_now_ms())
                except ReadingRejectedError as exc:
                    reject(str(exc.reason), str(exc))
                    continue
                await deliver(sample)

        what = f"hub broker {self.host}:{self.port} of sensor {self.name}"
        await stay_connected(lambda: self._connect(reject), serve, (aiomqtt.MqttError,), self.reconnect, log, what)

    @contextlib.asynccontextmanager
    async def _connect(self, reject: Callable[[str, str], None]) -> AsyncIterator[aiomqtt.Client]:
        """One connection; its failure (refused, unreachable, lost) is counted in the sensor's health before the
        reconnect loop sees it."""
        try:
            async with self._client() as client:
                yield client
        except aiomqtt.MqttError as exc:
            reject(BROKER_LOST, str(exc) or type(exc).__name__)
            raise

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=f"midgate-sensor-{self.name}",
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            keepalive=30,
            max_queued_incoming_messages=INCOMING_BOUND,
        )

    def close(self) -> None:
        pass
