"""Sensor and store configuration: TOML tables to validated models to drivers; unknown fields are refused."""

from __future__ import annotations

import sys
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


def test_a_replay_of_any_file_is_configured_in_full(tmp_path: Path) -> None:
    ts = tmp_path / "rec.ts"
    ts.write_text(
        "@problemName R\n@univariate false\n@dimensions 2\n@classLabel true 1 2\n@data\n1,2:3,4:1\n5,6:7,8:2\n9:10:1\n"
    )
    toml = f"""
[[sensors]]
driver = "replay"
name = "rec"
path = "{ts}"
channels = ["current", "voltage"]
class_names = ["fan", "fridge"]
classes = ["fridge", "fan"]
series = "1:"
speed = "max"
"""
    config = SENSORS.validate_python(tomllib.loads(toml)["sensors"])[0]
    assert config.fast and config.series_selection() == range(1, sys.maxsize)
    sensor = build_sensor(config)
    assert [c.name for c in sensor.channels] == ["current", "voltage"] and sensor.class_names == ("fan", "fridge")
    assert [(s.values, s.label) for s in sensor.samples(0)] == [((5.0, 7.0), 1), ((6.0, 8.0), 1), ((9.0, 10.0), 0)]
    assert SENSORS.validate_python([{"driver": "replay", "series": "0:150:2"}])[0].series_selection() == range(
        0, 150, 2
    )


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"channels": ["a", "b", "c"]}, "3 channel names for 2 dimensions"),
        ({"class_names": ["x"]}, "1 class names for 2 labels"),
        ({"classes": ["oven"]}, "unknown classes"),
    ],
)
def test_a_replay_its_file_contradicts_is_unavailable_with_the_reason(
    tmp_path: Path, extra: dict[str, object], why: str
) -> None:
    ts = tmp_path / "rec.ts"
    ts.write_text("@problemName R\n@univariate false\n@dimensions 2\n@classLabel true 1 2\n@data\n1:2:1\n")
    config = SENSORS.validate_python([{"driver": "replay", "path": str(ts), **extra}])[0]
    with pytest.raises(SensorUnavailableError, match=why):
        build_sensor(config)


def test_bad_replay_settings_are_refused() -> None:
    for bad in ({"series": "a:b"}, {"speed": "fast"}, {"speed": 0}, {"channels": []}):
        with pytest.raises(ValidationError):
            SENSORS.validate_python([{"driver": "replay", **bad}])
