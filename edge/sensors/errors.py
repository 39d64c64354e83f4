"""Typed sensor failures. Each carries a stable reason code from `protocol.errors` so the sampler can record it as a
quality flag and a log line can say which device, register or file failed."""

from __future__ import annotations

from protocol.errors import MalformedError, ProtocolError, Reason, TooLargeError

__all__ = [
    "MalformedError",
    "MissingInputsError",
    "ReplayEndedError",
    "SensorError",
    "SensorIOError",
    "SensorUnavailableError",
    "StoreNotReadyError",
    "TooFewWindowsError",
    "TooLargeError",
]


class SensorError(ProtocolError):
    """Base of failures while reading a sensor; the sampler retries these with backoff."""

    reason = Reason.SENSOR_IO


class SensorUnavailableError(SensorError):
    """The sensor is not there (missing sysfs file, no device at the I2C address, data set not installed)."""

    reason = Reason.SENSOR_UNAVAILABLE


class SensorIOError(SensorError):
    """The sensor is there but a read failed (I2C NACK, EIO, short read)."""

    reason = Reason.SENSOR_IO


class ReplayEndedError(SensorUnavailableError):
    """A replay that does not loop has played all its data: the sensor is done, not broken (the scheduler stops
    sampling it instead of retrying)."""


class StoreNotReadyError(MalformedError):
    """A reader opened the sample store while the daemon was still creating it (the file exists, its schema does not
    yet): there is nothing to read, which is not the same as a damaged store."""


class MissingInputsError(MalformedError):
    """The store holds no data a task can train on: no sensor has the task's features, or the labels of those that
    do have no class names or names outside the task's classes. `details["sensors"]` says why, per sensor."""


class TooFewWindowsError(MalformedError):
    """The store's fitting data gives fewer windows than a job needs."""
