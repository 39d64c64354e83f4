"""A small sensor's message as the hub takes it (edge.sensors.hub_reading, edge.sensors.mqtt): the payloads ESP32
firmware publishes become samples through the member's explicit field mapping, and every bad message is refused with
its reason code, the offending field named."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from edge.sensors.config import MqttConfig, SensorConfig
from edge.sensors.hub_reading import ReadingRejectedError, RejectReason, parse_reading
from edge.sensors.mqtt import MqttSensor
from edge.sensors.sample import ChannelSpec

NOW_MS = 1_765_000_000_000
SENSORS = TypeAdapter(list[SensorConfig])


def config(**changes: object) -> MqttConfig:
    fields: dict[str, object] = {
        "name": "kitchen",
        "topic": "sensors/kitchen",
        "channels": [
            {"name": "temperature_c", "field": "temperature", "unit": "°C"},
            {"name": "humidity_pct", "field": "humidity", "unit": "%RH"},
        ],
    }
    return MqttConfig.model_validate(fields | changes)


def test_a_zigbee2mqtt_style_object_becomes_one_sample_in_channel_order() -> None:
    payload = b'{"humidity": 40, "temperature": 21.5, "linkquality": 120, "battery": 97}'
    sample = parse_reading("kitchen", payload, config().shape(), NOW_MS)
    assert (sample.sensor, sample.t_ms, sample.values) == ("kitchen", NOW_MS, (21.5, 40.0))


def test_a_tasmota_sensor_message_is_read_through_nested_field_paths() -> None:
    tasmota = config(
        channels=[
            {"name": "temperature_c", "field": "BME280.Temperature", "unit": "°C"},
            {"name": "pressure_hpa", "field": "BME280.Pressure", "unit": "hPa"},
        ]
    )
    payload = (
        b'{"Time":"2026-12-07T09:00:00","BME280":{"Temperature":21.3,"Humidity":44.1,"Pressure":1012.9},"TempUnit":"C"}'
    )
    sample = parse_reading("kitchen", payload, tasmota.shape(), NOW_MS)
    assert sample.values == (21.3, 1012.9)
    assert tasmota.shape().channels == (ChannelSpec("temperature_c", "°C"), ChannelSpec("pressure_hpa", "hPa"))


@pytest.mark.parametrize(
    ("unit", "value", "expected_ms"),
    [("s", NOW_MS / 1000 - 2.5, NOW_MS - 2500), ("ms", NOW_MS - 40, NOW_MS - 40)],
)
def test_the_sensor_s_own_clock_stamps_the_reading_when_a_time_field_is_named(
    unit: str, value: float, expected_ms: int
) -> None:
    shape = config(time_field="ts", time_unit=unit).shape()
    payload = f'{{"temperature": 20, "humidity": 50, "ts": {value}}}'.encode()
    assert parse_reading("kitchen", payload, shape, NOW_MS).t_ms == expected_ms


@pytest.mark.parametrize(
    ("payload", "reason", "detail"),
    [
        (b"21.5", RejectReason.NOT_AN_OBJECT, "number"),  # ESPHome's per-sensor state topic: one bare value
        (b"[1, 2]", RejectReason.NOT_AN_OBJECT, "array"),
        (b"temperature=21.5", RejectReason.NOT_JSON, ""),
        (b'{"temperature": 21.5, "humidity": 4', RejectReason.NOT_JSON, ""),
        (b"\xff\xfe{}", RejectReason.NOT_JSON, ""),
        (b"[" * 3000 + b"]" * 3000, RejectReason.TOO_LARGE, ""),
        (b'{"temperature": 21.5}', RejectReason.MISSING_FIELD, "humidity"),
        (b'{"temperature": "21.5", "humidity": 40}', RejectReason.WRONG_TYPE, "string"),
        (b'{"temperature": true, "humidity": 40}', RejectReason.WRONG_TYPE, "boolean"),
        (b'{"temperature": null, "humidity": 40}', RejectReason.WRONG_TYPE, "null"),
        (b'{"temperature": {"v": 1}, "humidity": 40}', RejectReason.WRONG_TYPE, "object"),
        (b'{"temperature": NaN, "humidity": 40}', RejectReason.NOT_FINITE, "temperature"),
        (b'{"temperature": -Infinity, "humidity": 40}', RejectReason.NOT_FINITE, "temperature"),
        (b'{"temperature": 1e999, "humidity": 40}', RejectReason.NOT_FINITE, "temperature"),
        (b'{"temperature": 1' + b"0" * 400 + b', "humidity": 40}', RejectReason.NOT_FINITE, "temperature"),
    ],
)
def test_a_bad_message_is_refused_with_its_reason(payload: bytes, reason: RejectReason, detail: str) -> None:
    with pytest.raises(ReadingRejectedError) as refused:
        parse_reading("kitchen", payload, config().shape(), NOW_MS)
    assert refused.value.reason is reason
    assert detail in str(refused.value)


def test_a_nested_path_through_a_value_that_is_not_an_object_is_a_missing_field() -> None:
    shape = config(channels=[{"name": "t", "field": "BME280.Temperature"}]).shape()
    with pytest.raises(ReadingRejectedError) as refused:
        parse_reading("kitchen", b'{"BME280": 21.5}', shape, NOW_MS)
    assert refused.value.reason is RejectReason.MISSING_FIELD and "BME280.Temperature" in str(refused.value)


def test_a_message_over_the_size_limit_is_refused_before_it_is_parsed() -> None:
    shape = config(max_message_bytes=64).shape()
    payload = b'{"temperature": 21.5, "humidity": 40, "note": "' + b"x" * 64 + b'"}'
    with pytest.raises(ReadingRejectedError) as refused:
        parse_reading("kitchen", payload, shape, NOW_MS)
    assert refused.value.reason is RejectReason.TOO_LARGE and refused.value.details["found"] == len(payload)


@pytest.mark.parametrize("offset_s", [-301, 301, -NOW_MS / 1000])  # a clock never synchronised says 1970
def test_a_sensor_time_far_from_the_hub_s_is_refused(offset_s: float) -> None:
    shape = config(time_field="ts").shape()
    payload = f'{{"temperature": 20, "humidity": 50, "ts": {NOW_MS / 1000 + offset_s}}}'.encode()
    with pytest.raises(ReadingRejectedError) as refused:
        parse_reading("kitchen", payload, shape, NOW_MS)
    assert refused.value.reason is RejectReason.CLOCK_SKEW


def test_retained_and_repeated_readings_are_refused_and_the_next_good_one_is_taken() -> None:
    sensor = MqttSensor(
        "kitchen",
        host="127.0.0.1",
        port=1883,
        topic="sensors/kitchen",
        shape=config(time_field="ts", time_unit="ms").shape(),
        source="bme280",
        period_ms=1000,
    )

    def message(t_ms: int) -> bytes:
        return f'{{"temperature": 20, "humidity": 50, "ts": {t_ms}}}'.encode()

    with pytest.raises(ReadingRejectedError) as retained:
        sensor.reading(message(NOW_MS), retained=True, received_ms=NOW_MS)
    assert retained.value.reason is RejectReason.RETAINED
    assert sensor.reading(message(NOW_MS), retained=False, received_ms=NOW_MS).t_ms == NOW_MS
    for repeated in (NOW_MS, NOW_MS - 1):  # a QoS 1 duplicate, then one from before
        with pytest.raises(ReadingRejectedError) as refused:
            sensor.reading(message(repeated), retained=False, received_ms=NOW_MS)
        assert refused.value.reason is RejectReason.OUT_OF_ORDER
    assert sensor.reading(message(NOW_MS + 1), retained=False, received_ms=NOW_MS).t_ms == NOW_MS + 1


@pytest.mark.parametrize(
    "changes",
    [
        {"topic": "sensors/+/state"},  # a wildcard would interleave two devices in one series
        {"topic": "sensors/#"},
        {"channels": []},
        {"channels": [{"name": "t", "field": "a..b"}]},
        {"channels": [{"name": "Temperature", "field": "t"}]},
        {"channels": [{"name": "t", "field": "a"}, {"name": "t", "field": "b"}]},
        {"port": 0},
        {"qos": 2},  # unknown keys are refused, not ignored
    ],
)
def test_a_config_that_cannot_describe_one_sensor_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        config(**changes)


def test_an_agent_toml_sensors_table_selects_the_mqtt_driver() -> None:
    [parsed] = SENSORS.validate_python(
        [
            {
                "driver": "mqtt",
                "name": "kitchen",
                "topic": "sensors/kitchen",
                "source": "bme280",
                "channels": [{"name": "temperature_c", "field": "temperature", "unit": "°C"}],
            }
        ]
    )
    assert isinstance(parsed, MqttConfig) and (parsed.host, parsed.port, parsed.source) == ("127.0.0.1", 1883, "bme280")
