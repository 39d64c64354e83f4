"""The mqtt driver against a real Mosquitto, inside the agent's real SampleCollection and SQLite store: an ESP32
(played by an aiomqtt publisher) sends good readings between bad ones; the good ones are stored with their channels
and source, the bad ones counted by reason in the sensor's health and never stored, and a broker that goes away and
comes back on its port is reconnected without a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from mqtt_fixtures import MosquittoProcess

from edge.sensors.collection import SampleCollection
from edge.sensors.config import MqttConfig
from edge.sensors.store import SampleStore
from edge.sensors.windows import WindowSpec

pytest_plugins = ["mqtt_fixtures"]
pytestmark = pytest.mark.timeout(120)

TOPIC = "sensors/kitchen"


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


async def publish(port: int, *payloads: bytes, retain: bool = False) -> None:
    """What an ESP32 does: connect, publish its readings on its topic, go."""
    async with aiomqtt.Client("127.0.0.1", port, identifier="esp32-kitchen") as esp32:
        for payload in payloads:
            await esp32.publish(TOPIC, payload, qos=1, retain=retain)


def reading(t: float, h: float) -> bytes:
    return f'{{"temperature": {t}, "humidity": {h}, "rssi": -61}}'.encode()


def kitchen(port: int) -> MqttConfig:
    return MqttConfig.model_validate(
        {
            "name": "kitchen",
            "topic": TOPIC,
            "port": port,
            "source": "bme280",
            "period_ms": 1000,
            "channels": [
                {"name": "temperature_c", "field": "temperature", "unit": "°C"},
                {"name": "humidity_pct", "field": "humidity", "unit": "%RH"},
            ],
        }
    )


def test_good_readings_are_stored_bad_ones_counted_and_a_lost_broker_reconnected(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    async def scenario(store: SampleStore) -> None:
        await publish(mosquitto.port, b"an old reading", retain=True)  # handed over again at every subscription
        collection = SampleCollection([kitchen(mosquitto.port)], store, health_interval_s=0.1, flush_interval_s=0.05)
        async with collection:
            assert collection.scheduler is not None
            status = collection.scheduler.status["kitchen"]
            await until(lambda: status.errors["retained"] == 1, "the retained message refused")
            await publish(
                mosquitto.port,
                reading(21.5, 40),
                b"not json",
                b'{"temperature": 21.6}',
                b'{"temperature": "warm", "humidity": 41}',
                b'{"temperature": NaN, "humidity": 41}',
                b"{" + b" " * 5000 + b"}",
                reading(21.75, 42),
            )
            await until(lambda: status.samples == 2 and status.failures == 6, "two taken, six refused")
            assert status.errors == {
                "retained": 1,
                "not_json": 1,
                "missing_field": 1,
                "wrong_type": 1,
                "not_finite": 1,
                "too_large": 1,
            }
            mosquitto.stop()
            await until(lambda: status.errors["broker_lost"] >= 1, "the lost broker counted")
            mosquitto.start()
            await until(lambda: status.errors["retained"] == 2, "subscribed again (the retained message again)")
            await publish(mosquitto.port, reading(22.0, 43))
            await until(lambda: status.samples == 3, "the reading after the reconnect taken")

    with SampleStore(tmp_path / "samples.db") as store:
        asyncio.run(scenario(store))
        newest_first = [s.values for s in store.latest("kitchen", 10)]
        health = {h.name: h for h in store.health()}
        fitting, _ = store.fitting_sensors(
            WindowSpec("", ("temperature_c", "humidity_pct"), 1, units=("°C", "%RH"), sources=("bme280",))
        )
    assert newest_first == [(22.0, 43.0), (21.75, 42.0), (21.5, 40.0)]
    assert fitting == ["kitchen"]  # a task taking BME280 temperature and humidity can use the ESP32's readings
    assert health["kitchen"].driver == "mqtt" and health["kitchen"].state == "stopped"
    assert health["kitchen"].errors["not_json"] == 1 and health["kitchen"].errors["broker_lost"] >= 1
