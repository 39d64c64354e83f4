"""Sensor and store configuration: TOML tables to validated models to drivers; unknown fields are refused."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from edge.sensors.config import SampleStoreConfig, SensorConfig, build_sensor
from edge.sensors.errors import SensorUnavailableError
from edge.sensors.sample import Sample

CONFIG = """
[sample_store]
max_age_days = 1
max_bytes = 1048576

[[sensors]]
driver = "simulated"
device = "home-7"
period_ms = 500

[[sensors]]
driver = "replay"
classes = ["fridge", "heater"]

[[sensors]]
driver = "bme280"
bus_number = 250
"""

SENSORS = TypeAdapter(list[SensorConfig])


def test_toml_builds_the_sensors_and_store(tmp_path: Path) -> None:
    data = tomllib.loads(CONFIG)
    configs = SENSORS.validate_python(data["sensors"])
    simulated = build_sensor(configs[0])
    assert simulated.period_ms == 500 and simulated.read(0).sensor == "env"
    replay = build_sensor(configs[1])
    assert {s.label for s in replay.samples(0, count=20_000)} == {3, 5}  # type: ignore[attr-defined]
    with pytest.raises(SensorUnavailableError):  # no /dev/i2c-250 here: a clear error, not a crash
        build_sensor(configs[2])
    store_config = SampleStoreConfig(path=tmp_path / "sub" / "samples.db", **data["sample_store"])
    with store_config.open() as store:
        assert store.retention.max_age_ms == 86_400_000 and store.retention.max_bytes == 1048576
        store.register("env", simulated.channels)
        assert store.write([Sample("env", 0, simulated.read(0).values)]) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"driver": "linux", "period_ms": 1000, "colour": "red"},  # unknown field
        {"driver": "teleport"},  # unknown driver
        {"driver": "simulated", "period_ms": 0},  # not a rate
        {"driver": "bme280", "address": 0x42},  # BME280 answers only at 0x76 or 0x77
        {"driver": "simulated", "name": "Bad Name!"},
    ],
)
def test_bad_sensor_config_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SENSORS.validate_python([bad])
