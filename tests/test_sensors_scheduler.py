"""The sampling scheduler on a real event loop writing to a real SampleStore."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from edge.sensors.errors import SensorIOError
from edge.sensors.sample import ChannelSpec, Quality, Sample
from edge.sensors.scheduler import SamplingScheduler
from edge.sensors.simulated import SimulatedEnvironmentSensor
from edge.sensors.store import EncodedSample, SampleStore

pytestmark = pytest.mark.timeout(60)


class FlakySensor:
    """A sensor that fails whenever `failing()` says so (e.g. an I2C device unplugged and plugged back)."""

    channels = (ChannelSpec("x", ""),)
    class_names: tuple[str, ...] = ()
    source = "flaky"
    blocking = False

    def __init__(self, name: str, period_ms: float, failing: Callable[[int], bool]) -> None:
        self.name, self.period_ms, self.failing, self.reads = name, period_ms, failing, 0

    def read(self, t_ms: int) -> Sample:
        self.reads += 1
        if self.failing(self.reads):
            raise SensorIOError("I2C transfer failed", address="0x76", error="[Errno 121] Remote I/O error")
        return Sample(self.name, t_ms, (float(self.reads),))

    def close(self) -> None:
        pass


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def rows(store: SampleStore, sensor: str) -> list[Sample]:
    return list(reversed(store.latest(sensor, 1_000_000)))


def test_sensors_sample_at_their_own_rates_on_a_drift_free_grid(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "d.db")
    fast = SimulatedEnvironmentSensor("fast", device="a", period_ms=10, dropout=0)
    slow = SimulatedEnvironmentSensor("slow", device="b", period_ms=50, dropout=0)

    async def main() -> SamplingScheduler:
        async with SamplingScheduler([fast, slow], store, flush_interval_s=0.05) as scheduler:
            await until(lambda: scheduler.status["slow"].samples >= 20)
        return scheduler

    scheduler = asyncio.run(main())
    for name, period in (("fast", 10), ("slow", 50)):
        times = np.array([s.t_ms for s in rows(store, name)])
        assert len(times) == scheduler.status[name].samples >= 20
        steps = np.diff(times)
        # Every stamp is on the sensor's own grid: start + k * period (missed ticks leave multiples, never drift).
        assert (steps % period == 0).all() and (steps > 0).all(), steps
    assert scheduler.written == store.count()
    store.close()


def test_a_failing_sensor_is_retried_with_backoff_and_never_stops_the_others(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "d.db")
    dead = FlakySensor("dead", 10, lambda _: True)
    healthy = SimulatedEnvironmentSensor("healthy", device="a", period_ms=10, dropout=0)

    async def main() -> SamplingScheduler:
        async with SamplingScheduler([dead, healthy], store, backoff_initial_s=0.02, flush_interval_s=0.05) as s:
            await until(lambda: s.status["dead"].failures >= 4 and s.status["healthy"].samples >= 100)
        return s

    scheduler = asyncio.run(main())
    status = scheduler.status["dead"]
    failed = rows(store, "dead")
    assert len(failed) == status.failures == dead.reads
    assert all(s.quality == Quality.ERROR and np.isnan(s.values[0]) for s in failed)
    assert failed[0].error is not None and "sensor_io" in failed[0].error and "0x76" in failed[0].error
    gaps = np.diff([s.t_ms for s in failed])
    # Retry i waits at least 20 ms * 2^i after the failure before it; a busy machine can only make gaps longer.
    assert all(gap >= 20 * 2**i for i, gap in enumerate(gaps)), gaps
    assert status.skipped_ticks > 0
    assert scheduler.status["healthy"].samples >= 100
    store.close()


def test_the_first_good_sample_after_failures_says_so(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "d.db")
    flaky = FlakySensor("flaky", 10, lambda n: n in (3, 4))

    async def main() -> None:
        async with SamplingScheduler([flaky], store, backoff_initial_s=0.01, flush_interval_s=0.05) as s:
            await until(lambda: s.status["flaky"].samples >= 6)

    asyncio.run(main())
    got = rows(store, "flaky")
    assert [s.quality & Quality.ERROR for s in got[:5]] == [0, 0, Quality.ERROR, Quality.ERROR, 0]
    assert got[4].quality & Quality.RETRIED and got[4].quality & Quality.SKIPPED_TICKS
    assert not got[5].quality & (Quality.ERROR | Quality.RETRIED)  # (LATE may be set on a busy machine)
    store.close()


class GatedStore(SampleStore):
    """A real store whose writes wait for a gate, standing in for a slow SD card."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def write_encoded(self, rows: Sequence[EncodedSample]) -> int:
        self.waiting.set()
        self.gate.wait(30)
        return super().write_encoded(rows)


def test_backpressure_bounds_the_queue_and_skips_ticks_instead(tmp_path: Path) -> None:
    store = GatedStore(tmp_path / "d.db")
    sensor = SimulatedEnvironmentSensor("env", device="a", period_ms=5, dropout=0)

    async def main() -> SamplingScheduler:
        scheduler = SamplingScheduler([sensor], store, queue_size=8, batch_size=4, flush_interval_s=0.01)
        async with scheduler:
            await until(lambda: store.waiting.is_set() and scheduler._queue.full())
            await asyncio.sleep(0.2)  # not a readiness wait: time for ticks to pass while the store is stuck
            queued = scheduler._queue.qsize()
            store.gate.set()
            await until(lambda: scheduler.status["env"].skipped_ticks > 0 and scheduler.status["env"].samples > 40)
        assert queued <= 8
        return scheduler

    scheduler = asyncio.run(main())
    got = rows(store, "env")
    assert len(got) == scheduler.status["env"].samples  # nothing queued was lost
    assert any(s.quality & Quality.SKIPPED_TICKS for s in got)
    store.close()


def test_duplicate_sensor_names_are_refused(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "d.db") as store, pytest.raises(ValueError):
        SamplingScheduler([FlakySensor("a", 10, bool), FlakySensor("a", 10, bool)], store)
