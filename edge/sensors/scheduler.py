"""The sampling scheduler: every sensor at its own rate on one asyncio loop, writing to the sample store in batches.

- No drift: tick k of a sensor is due at start + k * period on the monotonic clock, never "last tick + period", so
  lateness does not accumulate; samples are stamped with their tick's due time mapped to UTC ms through one anchor
  (wall clock read once at start), so a wall-clock step (NTP) cannot reorder or bunch samples.
- Backpressure: samples go through a bounded queue; when the store falls behind, `put` waits, the sensor misses its
  ticks and the next sample says so (SKIPPED_TICKS) rather than the queue growing without bound or a burst of
  catch-up reads.
- Failures: a read that raises becomes an ERROR sample naming the error; the sensor then waits an exponential
  backoff (doubling from `backoff_initial_s` to `backoff_max_s`) before the next try, and its first good sample after
  that is flagged RETRIED. Other sensors never notice. A replay that has played all its data (ReplayEndedError) is
  done, not failing: its task ends.
- Blocking drivers (I2C, file replay) are read in a worker thread, and store writes always are, so the loop keeps
  its timing.
- Pushed sensors (a small sensor's topic on the hub's broker: edge.sensors.driver.PushedSensor) have no ticks: each
  message is one sample, queued like a polled one (so the same backpressure holds them back). A message they refuse
  is counted by reason, logged (the 1st, 2nd, 4th, 8th, ... time) and never stored; the next good one is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge.sensors.driver import PushedSensor, Sensor
from edge.sensors.errors import MalformedError, ReplayEndedError
from edge.sensors.sample import ChannelSpec, Quality, Sample
from edge.sensors.store import EncodedSample

log = logging.getLogger("midgate.sensors")


class SampleSink(Protocol):
    """Where samples go; `SampleStore` is one. `encode` runs on the event loop, `write_encoded` in a thread."""

    def register(
        self, sensor: str, channels: Sequence[ChannelSpec], classes: Sequence[str] = (), source: str = ""
    ) -> None: ...

    def encode(self, sample: Sample) -> EncodedSample: ...

    def write_encoded(self, rows: Sequence[EncodedSample]) -> int: ...


class UtcClock:
    """The monotonic clock mapped to UTC milliseconds through one anchor taken at creation."""

    def __init__(self) -> None:
        self.anchor_wall_ns = time.time_ns()
        self.anchor_mono_ns = time.monotonic_ns()

    def utc_ms(self, mono_ns: int) -> int:
        return (self.anchor_wall_ns + (mono_ns - self.anchor_mono_ns)) // 1_000_000


@dataclass
class SensorStatus:
    """What the scheduler knows about one sensor; `lateness_ns` keeps the last 10,000 tick latenesses, `errors`
    counts failed reads by reason code (sensor_io, sensor_unavailable, malformed, ...); `ended`: a replay that
    played all its data."""

    name: str
    period_ms: float
    samples: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    skipped_ticks: int = 0
    last_error: str | None = None
    last_sample: Sample | None = None
    errors: Counter[str] = field(default_factory=Counter)
    ended: bool = False
    lateness_ns: deque[int] = field(default_factory=lambda: deque(maxlen=10_000))


class SamplingScheduler:
    """Samples `sensors` into `sink` while the `async with` block runs.

    Parameters
    ----------
    sensors: the sensors, polled or pushed; names must be unique.
    sink: where batches go (a SampleStore), written from a worker thread.
    queue_size: bound of the sample queue (backpressure beyond it); default 10,000.
    batch_size: samples per write; default 2,000.
    flush_interval_s: longest time a sample waits before it is written; default 1.0.
    backoff_initial_s, backoff_max_s: retry backoff of a failing sensor; defaults 1.0 and 60.0.
    """

    def __init__(
        self,
        sensors: Sequence[Sensor | PushedSensor],
        sink: SampleSink,
        *,
        queue_size: int = 10_000,
        batch_size: int = 2_000,
        flush_interval_s: float = 1.0,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
    ) -> None:
        names = [s.name for s in sensors]
        if len(set(names)) != len(names):
            raise ValueError(f"sensor names must be unique: {names}")
        self.sensors = list(sensors)
        self.sink = sink
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = UtcClock()
        self.status = {s.name: SensorStatus(s.name, s.period_ms) for s in sensors}
        self.written = 0
        self.write_failures = 0
        self._queue: asyncio.Queue[Sample | None] = asyncio.Queue(maxsize=queue_size)
        self._sensor_tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._pending: list[EncodedSample] = []  # collected by the writer, not yet handed to the store
        self.rejected = 0  # samples the store refused to encode (a driver bug); dropped, logged

    async def __aenter__(self) -> SamplingScheduler:
        for sensor in self.sensors:
            await asyncio.to_thread(self.sink.register, sensor.name, sensor.channels, sensor.class_names, sensor.source)
        start = time.monotonic_ns()
        n = len(self.sensors)
        # Sensors' grids are staggered across one period so that ten 100 Hz sensors do not all wake at one instant
        # and queue behind each other.
        self._sensor_tasks = [
            asyncio.create_task(
                self._receive_forever(s)
                if isinstance(s, PushedSensor)
                else self._sample_forever(s, start + (i * int(s.period_ms * 1_000_000)) // n),
                name=f"sensor:{s.name}",
            )
            for i, s in enumerate(self.sensors)
        ]
        self._writer = asyncio.create_task(self._write_forever(), name="sample-writer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop sampling, then write everything still queued."""
        for task in self._sensor_tasks:
            task.cancel()
        for task in self._sensor_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sensor_tasks = []
        if self._writer is not None:
            await self._queue.put(None)  # the writer drains the queue up to this sentinel, then returns
            await self._writer
            self._writer = None

    async def _sample_forever(self, sensor: Sensor, start_ns: int) -> None:
        status = self.status[sensor.name]
        period_ns = max(int(sensor.period_ms * 1_000_000), 1)
        tick = 0
        flags = Quality.OK
        resume_ns = 0  # monotonic time before which a failing sensor is not tried again
        while True:
            due = start_ns + tick * period_ns
            if due < resume_ns:
                skip = -(-(resume_ns - due) // period_ns)
                tick += skip
                status.skipped_ticks += skip
                flags |= Quality.SKIPPED_TICKS
                continue
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            now = time.monotonic_ns()
            late = now - due
            status.lateness_ns.append(late)
            if late >= period_ns:  # missed whole ticks: skip them rather than read in a burst
                missed = late // period_ns
                status.skipped_ticks += missed
                tick += missed
                due += missed * period_ns
                flags |= Quality.SKIPPED_TICKS
            if late > period_ns // 2:
                flags |= Quality.LATE
            t_ms = self.clock.utc_ms(due)
            tick += 1
            try:
                sample = await asyncio.to_thread(sensor.read, t_ms) if sensor.blocking else sensor.read(t_ms)
                if len(sample.values) != len(sensor.channels):
                    raise MalformedError(
                        "sensor returned the wrong number of values",
                        sensor=sensor.name,
                        expected=len(sensor.channels),
                        found=len(sample.values),
                    )
            except asyncio.CancelledError:
                raise
            except ReplayEndedError:
                status.ended = True
                log.info("sensor %s played all its data (%d samples)", sensor.name, status.samples)
                return
            except Exception as exc:  # any driver failure is recorded; it must never end the loop
                status.failures += 1
                status.errors[str(getattr(exc, "reason", type(exc).__name__))] += 1
                status.consecutive_failures += 1
                status.last_error = str(exc)
                backoff = min(self.backoff_initial_s * 2 ** (status.consecutive_failures - 1), self.backoff_max_s)
                resume_ns = time.monotonic_ns() + int(backoff * 1e9)
                if status.consecutive_failures & (status.consecutive_failures - 1) == 0:  # 1st, 2nd, 4th, 8th, ...
                    log.warning(
                        "sensor %s failed %d times in a row (%s); retry in %.2f s",
                        sensor.name,
                        status.consecutive_failures,
                        exc,
                        backoff,
                    )
                await self._queue.put(Sample.failed(sensor.name, t_ms, len(sensor.channels), str(exc)))
                flags = Quality.RETRIED
                continue
            if status.consecutive_failures:
                status.consecutive_failures = 0
            if flags:
                sample = dataclasses.replace(sample, quality=sample.quality | flags)
                flags = Quality.OK
            status.samples += 1
            status.last_sample = sample
            await self._queue.put(sample)

    async def _receive_forever(self, sensor: PushedSensor) -> None:
        status = self.status[sensor.name]

        async def deliver(sample: Sample) -> None:
            status.samples += 1
            status.last_sample = sample
            await self._queue.put(sample)

        def reject(reason: str, text: str) -> None:
            status.failures += 1
            status.errors[reason] += 1
            status.last_error = text
            if status.failures & (status.failures - 1) == 0:  # 1st, 2nd, 4th, 8th, ...
                log.warning("sensor %s: %s (%d refused or lost so far)", sensor.name, text, status.failures)

        await sensor.receive(deliver, reject)

    async def _write_forever(self) -> None:
        """Collect up to `batch_size` samples or `flush_interval_s`, write them; ends at the `None` sentinel.
        Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that races with a completed get."""
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            if first is None:
                return
            self._take(first)
            stopping = False
            try:
                async with asyncio.timeout_at(loop.time() + self.flush_interval_s):
                    while len(self._pending) < self.batch_size:
                        item = await self._queue.get()  # cancel-safe: an item is only taken when this resumes
                        if item is None:
                            stopping = True
                            break
                        self._take(item)
            except TimeoutError:
                pass
            batch, self._pending = self._pending, []
            await self._write_batch(batch, retry=not stopping)
            if stopping:
                return

    def _take(self, sample: Sample) -> None:
        try:
            self._pending.append(self.sink.encode(sample))
        except MalformedError as exc:  # cannot succeed on retry; drop this sample, keep the rest going
            self.rejected += 1
            log.error("sample store rejected a sample: %s", exc)

    async def _write_batch(self, batch: list[EncodedSample], *, retry: bool) -> None:
        delay = 0.1
        while True:
            try:
                self.written += await asyncio.to_thread(self.sink.write_encoded, batch)
                return
            except Exception as exc:  # disk full, locked database: keep the batch, let backpressure build
                self.write_failures += 1
                log.error("sample store write failed (%s); retry in %.1f s", exc, delay)
                if not retry:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
