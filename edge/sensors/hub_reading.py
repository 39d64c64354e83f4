"""One reading of a home's small sensor (an ESP32 and the like) as it arrives on the hub's Mosquitto: a JSON object,
mapped to the sensor's channels by an explicit list of field paths, or rejected with a reason code.

The payload shape is the one ESP32 firmware really publishes: a flat or nested JSON object of numbers, e.g.
Zigbee2MQTT's `zigbee2mqtt/<device>` (`{"temperature": 21.5, "humidity": 40, "linkquality": 120}`), Tasmota's
`tele/<device>/SENSOR` (`{"Time": "...", "BME280": {"Temperature": 21.5, "Humidity": 40.1}}`, field path
`BME280.Temperature`), or a sketch of one's own. Nothing is guessed: the member names each field and its unit, and a
message that lacks one, or gives a string or a non-finite number, is refused whole (a reading with a hole would be
cut into a training window as if it were complete). The reading's time is the time it arrived at the hub, or, when
`time_field` is named, the sensor's own clock (seconds or milliseconds since the epoch) within `max_skew_ms` of the
hub's: a sensor whose clock never synchronised would otherwise stamp its readings in 1970.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from edge.sensors.sample import ChannelSpec, Sample
from protocol.errors import ReasonedError


class RejectReason(StrEnum):
    """Why a message from a small sensor was not taken; counted per reason in the sensor's health."""

    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    NOT_FINITE = "not_finite"
    CLOCK_SKEW = "clock_skew"
    OUT_OF_ORDER = "out_of_order"
    RETAINED = "retained"


class ReadingRejectedError(ReasonedError):
    """A message refused as a reading: `reason` is stable, `details` name the offending values."""

    reason: RejectReason

    def __init__(self, reason: RejectReason, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChannelField:
    """One channel of the sensor and the JSON field it is read from (`a.b` walks into nested objects)."""

    channel: ChannelSpec
    path: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ReadingShape:
    """How a message becomes a reading.

    Parameters
    ----------
    fields: the channels in order, each with its field path; at least one.
    time_path: the field holding the sensor's own time; empty: the time the message arrived.
    time_unit: "s" or "ms" since the epoch, UTC.
    max_bytes: larger messages are refused before they are parsed.
    max_skew_ms: a sensor's own time further than this from the hub's clock is refused.
    """

    fields: tuple[ChannelField, ...]
    time_path: tuple[str, ...] = ()
    time_unit: Literal["s", "ms"] = "s"
    max_bytes: int = 4096
    max_skew_ms: int = 300_000

    @property
    def channels(self) -> tuple[ChannelSpec, ...]:
        return tuple(f.channel for f in self.fields)


def parse_reading(sensor: str, payload: bytes, shape: ReadingShape, received_ms: int) -> Sample:
    """The reading `payload` carries, stamped per `shape`; raises ReadingRejectedError with the reason otherwise."""
    document = _json_object(payload, shape.max_bytes)
    values = tuple(_number(document, f.path) for f in shape.fields)
    t_ms = received_ms if not shape.time_path else _sensor_time(document, shape, received_ms)
    return Sample(sensor, t_ms, values)


def _json_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise ReadingRejectedError(RejectReason.TOO_LARGE, "message too large", limit=max_bytes, found=len(payload))
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deeply nested arrays
        raise ReadingRejectedError(RejectReason.NOT_JSON, "message is not JSON", error=str(exc)[:80]) from None
    if not isinstance(document, dict):
        raise ReadingRejectedError(RejectReason.NOT_AN_OBJECT, "message is not a JSON object", found=_kind(document))
    return document


def _number(document: dict[str, Any], path: tuple[str, ...]) -> float:
    """The finite number at `path`. JSON booleans are refused: Python counts them as integers."""
    value: Any = document
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise ReadingRejectedError(RejectReason.MISSING_FIELD, "field missing", field=".".join(path))
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReadingRejectedError(
            RejectReason.WRONG_TYPE, "field is not a number", field=".".join(path), found=_kind(value)
        )
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ReadingRejectedError(RejectReason.NOT_FINITE, "field is not a finite number", field=".".join(path))
    return number


def _sensor_time(document: dict[str, Any], shape: ReadingShape, received_ms: int) -> int:
    seconds_or_ms = _number(document, shape.time_path)
    t_ms = round(seconds_or_ms * 1000) if shape.time_unit == "s" else round(seconds_or_ms)
    if abs(t_ms - received_ms) > shape.max_skew_ms:
        raise ReadingRejectedError(
            RejectReason.CLOCK_SKEW,
            "the sensor's time is too far from the hub's",
            sensor_ms=t_ms,
            hub_ms=received_ms,
            limit_ms=shape.max_skew_ms,
        )
    return t_ms


def _kind(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")
