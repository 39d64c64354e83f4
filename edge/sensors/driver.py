"""The one interface every sensor driver implements, and the catalogue `midgate agent sensors list` shows."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from edge.sensors.sample import ChannelSpec, Sample


@runtime_checkable
class Sensor(Protocol):
    """A source of samples.

    `read(t_ms)` takes one reading and stamps it with `t_ms` (the scheduler's UTC time for this tick); it raises a
    `SensorError` (or `MalformedError` for a bad recorded line) when the whole reading failed, and returns a sample
    flagged PARTIAL when only some channels failed; a replay that does not loop raises `ReplayEndedError` once it
    has played everything. `period_ms` is the sensor's own sampling period. `blocking` drivers (bus or file I/O that
    can stall) are read in a worker thread so they never block the event loop. `class_names` names the label
    indexes a labelled source puts in its samples (empty for live sensors, which carry no labels). `source` is the kind
    of sensor the data comes from ("simulated", "linux", "bme280", "plaid", "replay" for a recorded file of unstated
    origin, or what the member declared for it): the store keeps it with the samples, and a task takes data only from
    the sources its inputs name (protocol.tasks.spec.TaskInput).
    """

    name: str
    channels: tuple[ChannelSpec, ...]
    class_names: tuple[str, ...]
    source: str
    period_ms: float
    blocking: bool

    def read(self, t_ms: int) -> Sample: ...

    def close(self) -> None: ...


@runtime_checkable
class PushedSensor(Protocol):
    """A source whose readings come when the sensor sends them (a subscription on the hub's broker), not when the
    scheduler asks: one sample per message, stamped by the message.

    `receive(deliver, reject)` runs until it is cancelled, keeping its connection with backoff: it awaits
    `deliver(sample)` for each good reading (which waits while the store falls behind) and calls
    `reject(reason, text)` for each message refused and each lost connection, which the scheduler counts by reason,
    logs and never stores. `period_ms` is how often the sensor is expected to send (for its health).
    """

    name: str
    channels: tuple[ChannelSpec, ...]
    class_names: tuple[str, ...]
    source: str
    period_ms: float

    async def receive(
        self, deliver: Callable[[Sample], Awaitable[None]], reject: Callable[[str, str], None]
    ) -> None: ...

    def close(self) -> None: ...


DRIVERS: dict[str, str] = {
    "simulated": "environment (temperature, humidity, pressure, CO2, power) with daily cycles, per-device "
    "differences, noise, dropouts, spikes and stuck values; deterministic for a seed",
    "linux": "host sensors: CPU load, memory, load average, network counters, thermal zones in /sys/class/thermal",
    "bme280": "Bosch BME280 temperature/humidity/pressure over I2C (smbus2), datasheet integer compensation",
    "mqtt": "a home's small sensors (ESP32, Tasmota, Zigbee2MQTT) publishing JSON readings to the hub's Mosquitto",
    "replay": "recorded data (CSV or UCR/UEA .ts, e.g. PLAID from the sktime wheel) at original or accelerated rate",
}
