"""What a sensor produces: one `Sample` per reading of one sensor, with quality flags.

A sample holds all channels of one sensor read at one instant, so that multi-channel training windows (e.g.
temperature, humidity and pressure of one BME280) are aligned by construction rather than joined by time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntFlag


class Quality(IntFlag):
    """Per-sample quality flags; stored as an integer, so members are only ever appended."""

    OK = 0
    ERROR = 1  # the read failed; values are NaN
    RETRIED = 2  # first good read after one or more failures
    LATE = 4  # taken more than one period after its deadline (the loop was busy or backpressured)
    SKIPPED_TICKS = 8  # ticks were dropped before this one (backoff or backpressure)
    PARTIAL = 16  # some channels failed; those values are NaN
    REPLAYED = 32  # from recorded data, not a live sensor


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """One measured quantity of a sensor. `name` matches task feature names (protocol.tasks.spec)."""

    name: str
    unit: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one sensor.

    `t_ms` is UTC milliseconds since the epoch; `values` follow the sensor's channel order; `label` is set by sources
    that carry ground truth (recorded, labelled data sets); `segment` groups samples of one recording so windows
    never straddle two recordings.
    """

    sensor: str
    t_ms: int
    values: tuple[float, ...]
    quality: Quality = Quality.OK
    label: int | None = None
    segment: int | None = None
    error: str | None = field(default=None, compare=False)

    @staticmethod
    def failed(sensor: str, t_ms: int, channels: int, error: str) -> Sample:
        return Sample(sensor, t_ms, (math.nan,) * channels, Quality.ERROR, error=error)
