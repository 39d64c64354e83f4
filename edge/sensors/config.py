"""Configuration of the sensors and the sample store: pydantic models the agent's settings embed (an agent.toml
`[[sensors]]` array and a `[sample_store]` table), and the factory that turns them into drivers."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edge.sensors.driver import PushedSensor, Sensor
from edge.sensors.errors import SensorUnavailableError
from edge.sensors.hub_reading import ChannelField, ReadingShape
from edge.sensors.linux import THERMAL_ROOT
from edge.sensors.sample import ChannelSpec
from edge.sensors.store import Retention, SampleStore
from protocol.private_files import private_file
from protocol.tasks.spec import SourceName

SensorName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
PeriodMs = Annotated[float, Field(gt=0.0, le=86_400_000.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimulatedConfig(_Strict):
    driver: Literal["simulated"] = "simulated"
    name: SensorName = "env"
    device: str = Field(default="device-0", max_length=128)
    seed: int = 0
    period_ms: PeriodMs = 1000.0
    dropout: Probability = 0.01
    spike: Probability = 0.002
    stuck: Probability = 0.01


class LinuxConfig(_Strict):
    driver: Literal["linux"] = "linux"
    name: SensorName = "host"
    period_ms: PeriodMs = 1000.0
    thermal_root: Path = THERMAL_ROOT


class Bme280Config(_Strict):
    driver: Literal["bme280"] = "bme280"
    name: SensorName = "bme280"
    bus_number: int = Field(default=1, ge=0, le=255)
    address: Literal[0x76, 0x77] = 0x76
    period_ms: PeriodMs = 1000.0


class MqttChannel(_Strict):
    """One channel of a small sensor: its name (the task feature it feeds), the JSON field it is read from, its unit."""

    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    field: Annotated[str, Field(pattern=r"^[^.\s]+(\.[^.\s]+)*$", max_length=128)] = Field(
        description='the JSON field, `a.b` inside nested objects (Tasmota: "BME280.Temperature")'
    )
    unit: str = Field(default="", max_length=16)


MqttTopic = Annotated[str, Field(pattern=r"^[^#+\x00]{1,256}$")]
"""One exact topic, no wildcards: one topic is one device's series (edge.sensors.mqtt)."""


class MqttConfig(_Strict):
    """A home's small sensor read through the hub's Mosquitto: one exact topic, its JSON fields mapped to channels
    (edge.sensors.hub_reading documents the payload)."""

    driver: Literal["mqtt"] = "mqtt"
    name: SensorName
    topic: MqttTopic = Field(description='the topic the sensor publishes its readings on, e.g. "sensors/kitchen"')
    channels: tuple[MqttChannel, ...] = Field(min_length=1, max_length=64)
    source: SourceName = Field(
        default="mqtt",
        description='the kind of sensor on the device (e.g. "bme280"), which tasks match; default "mqtt": of '
        "unstated kind, which no task takes",
    )
    host: str = Field(default="127.0.0.1", description="the hub's Mosquitto")
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = Field(default=None, max_length=128, description="the agent's login on the hub's broker")
    password_file: Path | None = Field(default=None, description="a file holding that login's password")
    period_ms: PeriodMs = Field(default=10_000.0, description="how often the sensor publishes (its health's rate)")
    time_field: str | None = Field(
        default=None,
        max_length=128,
        description="a field with the sensor's own time since the epoch; default none: the time the message arrives",
    )
    time_unit: Literal["s", "ms"] = "s"
    max_skew_s: float = Field(default=300.0, gt=0, description="refuse a sensor time further than this from the hub's")
    max_message_bytes: int = Field(default=4096, ge=64, le=1_048_576, description="refuse larger messages unread")

    @model_validator(mode="after")
    def _distinct_channels(self) -> Self:
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"channel names must be distinct, found {names}")
        return self

    def shape(self) -> ReadingShape:
        fields = tuple(ChannelField(ChannelSpec(c.name, c.unit), tuple(c.field.split("."))) for c in self.channels)
        return ReadingShape(
            fields,
            time_path=tuple(self.time_field.split(".")) if self.time_field else (),
            time_unit=self.time_unit,
            max_bytes=self.max_message_bytes,
            max_skew_ms=int(self.max_skew_s * 1000),
        )


SeriesSlice = Annotated[str, Field(pattern=r"^\d*:\d*(:[1-9]\d*)?$")]
"""Python slice syntax over series indices: "0:150", "150:", "::2"."""


class ReplayConfig(_Strict):
    """Replay of a recorded file (.csv or .ts); without `path`, PLAID from the installed sktime wheel.

    `speed = "max"` plays the data once, as fast as the store takes it, stamped at the recorded rate so that it ends
    when loading began (to load recordings, not to imitate a live sensor); the store remembers how far it got, so a
    restarted agent neither loads the same data twice nor starts over.
    """

    driver: Literal["replay"] = "replay"
    name: SensorName = "plaid"
    path: Path | None = None
    split: Literal["train", "test", "all"] = "train"
    rate_hz: float | None = Field(default=None, gt=0.0, le=1_000_000.0)
    speed: Annotated[float, Field(gt=0.0, le=1_000_000.0)] | Literal["max"] = 1.0
    channels: tuple[str, ...] | None = Field(
        default=None, min_length=1, description=".ts: names of the dimensions; CSV: the columns to play"
    )
    class_names: tuple[str, ...] | None = Field(
        default=None, min_length=1, description="names of the file's labels in label-index order"
    )
    classes: tuple[str, ...] | None = None
    source: SourceName | None = Field(
        default=None,
        description='the kind of sensor that recorded the file, which tasks match ("plaid" without `path`); default '
        '"replay": of unstated origin, which no task takes',
    )
    units: tuple[str, ...] | None = Field(
        default=None, min_length=1, description=".ts: the units of the dimensions (CSV: in the header, `name[unit]`)"
    )
    series: tuple[int, ...] | SeriesSlice | None = None
    loop: bool = True

    @property
    def fast(self) -> bool:
        return self.speed == "max"

    def series_selection(self) -> Sequence[int] | None:
        """`series` as indices: a tuple as it is, a slice string as a range (open-ended up to any length)."""
        if not isinstance(self.series, str):
            return self.series
        parts = [int(p) if p else None for p in self.series.split(":")]
        start, stop, step = [*parts, None, None][:3]
        return range(start or 0, sys.maxsize if stop is None else stop, step or 1)


AnySensorConfig = SimulatedConfig | LinuxConfig | Bme280Config | ReplayConfig | MqttConfig
SensorConfig = Annotated[AnySensorConfig, Field(discriminator="driver")]


class SampleStoreConfig(_Strict):
    path: Path = Field(
        default=Path("samples.db"),
        description="SQLite file of the device's samples (never leaves it); in agent.toml relative to data_dir",
    )
    max_age_days: float | None = Field(default=90.0, gt=0.0, description="drop samples older than this; none: keep")
    max_samples: int | None = Field(default=None, ge=1, description="keep at most this many samples, oldest dropped")
    max_bytes: int | None = Field(
        default=2 * 1024**3, ge=64 * 1024, description="keep the store under this size, oldest dropped first"
    )
    batch_size: int = Field(
        default=2000, ge=1, le=1_000_000, description="samples per write transaction (a crash loses at most one)"
    )

    def open(self) -> SampleStore:
        age = None if self.max_age_days is None else int(self.max_age_days * 86_400_000)
        retention = Retention(max_age_ms=age, max_samples=self.max_samples, max_bytes=self.max_bytes)
        return SampleStore(private_file(self.path), retention=retention, batch_size=self.batch_size)


def build_sensor(config: AnySensorConfig) -> Sensor | PushedSensor:
    """The driver a config describes; raises SensorUnavailableError when its hardware or data is not there."""
    if isinstance(config, MqttConfig):
        return _mqtt(config)
    if isinstance(config, SimulatedConfig):
        from edge.sensors.simulated import SimulatedEnvironmentSensor

        return SimulatedEnvironmentSensor(
            config.name,
            device=config.device,
            seed=config.seed,
            period_ms=config.period_ms,
            dropout=config.dropout,
            spike=config.spike,
            stuck=config.stuck,
        )
    if isinstance(config, LinuxConfig):
        from edge.sensors.linux import LinuxHostSensor

        return LinuxHostSensor(config.name, period_ms=config.period_ms, thermal_root=config.thermal_root)
    if isinstance(config, Bme280Config):
        from edge.sensors.bme280 import Bme280Sensor

        return Bme280Sensor(
            config.name, bus_number=config.bus_number, address=config.address, period_ms=config.period_ms
        )
    return _replay(config)


def _mqtt(config: MqttConfig) -> PushedSensor:
    from edge.sensors.mqtt import MqttSensor

    password = None
    if config.password_file is not None:
        try:
            password = config.password_file.read_text().strip()
        except OSError as exc:
            raise SensorUnavailableError(
                "cannot read the broker password", path=str(config.password_file), error=exc.strerror
            ) from exc
    return MqttSensor(
        config.name,
        host=config.host,
        port=config.port,
        topic=config.topic,
        shape=config.shape(),
        source=config.source,
        period_ms=config.period_ms,
        username=config.username,
        password=password,
    )


def _replay(config: ReplayConfig) -> Sensor:
    from edge.sensors.plaid import PLAID_CHANNELS, PLAID_CLASSES, PLAID_SOURCE, PLAID_UNITS, plaid_files
    from edge.sensors.replay import CsvReplaySensor, TsReplaySensor

    speed = 1.0 if config.speed == "max" else config.speed
    loop = config.loop and not config.fast
    try:
        if config.path is not None and config.path.suffix.lower() == ".csv":
            if config.series is not None:
                raise ValueError("series selects recordings of a .ts file; a CSV replay takes classes and channels")
            return CsvReplaySensor(
                config.name,
                config.path,
                rate_hz=config.rate_hz,
                speed=speed,
                loop=loop,
                channels=config.channels,
                class_names=config.class_names,
                classes=config.classes,
                source=config.source or "replay",
            )
        plaid = config.path is None
        return TsReplaySensor(
            config.name,
            plaid_files(config.split) if config.path is None else [config.path],
            rate_hz=config.rate_hz or 100.0,
            speed=speed,
            channel_names=config.channels or (PLAID_CHANNELS if plaid else None),
            series=config.series_selection(),
            classes=config.classes,
            class_names=config.class_names or (PLAID_CLASSES if plaid else None),
            loop=loop,
            channel_units=config.units or (PLAID_UNITS if plaid and not config.channels else None),
            source=config.source or (PLAID_SOURCE if plaid else "replay"),
        )
    except ValueError as exc:  # the file and the configuration disagree: say so as an unavailable sensor
        raise SensorUnavailableError(str(exc), sensor=config.name) from exc
