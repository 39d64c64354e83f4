"""Collection: every configured sensor sampled into the sample store for as long as its owner runs.

`midgate agent run` owns one (entered before the memberships start, left after they stop), and so does
`midgate agent sensors sample --config`. Live sensors run under one SamplingScheduler: polled ones at their
period, pushed ones (a small sensor's topic on the hub's broker) as their messages come. A replay with
`speed = "max"` is loaded instead: played once in a worker thread, as fast as the store takes it, stamped at its
recorded rate so that it ends when the load began (past data, never future data), and the store remembers how far
it got (meta key `replay-load:NAME`), so a restart neither loads the same recordings twice nor starts over (a crash
can repeat at most the batch in flight). Every `health_interval_s` the per-sensor health (rate,
last sample, errors by kind) replaces the store's sensor_health table, which `midgate agent status`, another
process, reads. Nothing here blocks the event loop: building drivers (files, buses), loads and store writes run in
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge.sensors.config import ReplayConfig, SampleStoreConfig, SensorConfig, build_sensor
from edge.sensors.driver import PushedSensor, Sensor
from edge.sensors.errors import ReplayEndedError
from edge.sensors.sample import Sample
from edge.sensors.scheduler import SamplingScheduler, SensorStatus
from edge.sensors.store import SampleStore, SensorHealth
from protocol.errors import ProtocolError

if TYPE_CHECKING:
    # Replays read recordings with numpy: imported by build_sensor for a replay only, so a Pi with live sensors
    # never loads it.
    from edge.sensors.replay import CsvReplaySensor, TsReplaySensor

log = logging.getLogger("midgate.sensors")

LOAD_BATCH = 5000
LOAD_KEY = "replay-load:"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class _Load:
    """A replay being loaded as fast as the store takes it (`speed = "max"`)."""

    config: ReplayConfig
    sensor: TsReplaySensor | CsvReplaySensor
    state: str = "loading"
    samples: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    last_sample: Sample | None = None


Built = list[tuple[SensorConfig, Sensor | PushedSensor]]


def start_sensors(configs: Sequence[SensorConfig]) -> tuple[Built, list[SensorHealth]]:
    """Build each configured driver; a sensor that cannot start (hardware or file missing, a configuration its data
    contradicts) is reported as unavailable with its reason, and the others go on. Blocking: call in a thread."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"sensor names must be unique: {names}")
    built: Built = []
    unavailable: list[SensorHealth] = []
    for config in configs:
        try:
            built.append((config, build_sensor(config)))
        except (ProtocolError, ValueError, OSError) as exc:
            log.warning("sensor %s (%s) not started: %s", config.name, config.driver, exc)
            period = getattr(config, "period_ms", 0.0)
            unavailable.append(SensorHealth(config.name, config.driver, "unavailable", period, last_error=str(exc)))
    return built, unavailable


class SampleCollection:
    """Samples every sensor of `configs` into `store` while the `async with` block runs.

    Parameters
    ----------
    configs: the `[[sensors]]` of agent.toml; names must be unique.
    store: the open sample store (its owner closes it).
    health_interval_s: how often the per-sensor health is written to the store; default 5.
    flush_interval_s: longest time a live sample waits before it is written; default 1.
    """

    def __init__(
        self,
        configs: Sequence[SensorConfig],
        store: SampleStore,
        *,
        health_interval_s: float = 5.0,
        flush_interval_s: float = 1.0,
    ) -> None:
        self.configs = list(configs)
        self.store = store
        self.health_interval_s = health_interval_s
        self.flush_interval_s = flush_interval_s
        self.scheduler: SamplingScheduler | None = None
        self.live: Built = []
        self.loads: list[_Load] = []
        self.unavailable: list[SensorHealth] = []
        self._stopping = threading.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._rate_base: dict[str, tuple[int, float]] = {}  # name -> (samples, monotonic s) at the last record

    @property
    def done(self) -> bool:
        """Nothing left to collect: no live sensor still sampling and every load over."""
        live = self.scheduler is not None and any(not s.ended for s in self.scheduler.status.values())
        return not live and all(load.state != "loading" for load in self.loads)

    @property
    def sensors(self) -> list[Sensor | PushedSensor]:
        return [s for _, s in self.live] + [load.sensor for load in self.loads]

    async def __aenter__(self) -> SampleCollection:
        built, self.unavailable = await asyncio.to_thread(start_sensors, self.configs)
        started = time.monotonic()
        for config, sensor in built:
            if isinstance(config, ReplayConfig) and config.fast:
                from edge.sensors.replay import CsvReplaySensor, TsReplaySensor

                assert isinstance(sensor, TsReplaySensor | CsvReplaySensor)
                self.loads.append(_Load(config, sensor))
            else:
                self.live.append((config, sensor))
            self._rate_base[sensor.name] = (0, started)
        self.scheduler = SamplingScheduler(
            [s for _, s in self.live], self.store, flush_interval_s=self.flush_interval_s
        )
        await self.scheduler.__aenter__()
        self._tasks = [asyncio.create_task(self._load(load), name=f"load:{load.sensor.name}") for load in self.loads]
        self._recorder = asyncio.create_task(self._record_forever(), name="sensor-health")
        if built or self.unavailable:
            log.info(
                "collecting: %d live sensors, %d replays to load, %d unavailable, into %s",
                len(self.live),
                len(self.loads),
                len(self.unavailable),
                self.store.path,
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stopping.set()  # a load ends after its current batch
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.scheduler is not None:
            await self.scheduler.stop()
        with contextlib.suppress(Exception):  # the last word is best effort; the samples are already stored
            await asyncio.to_thread(self.store.save_health, self.health(stopped=True))
        for sensor in self.sensors:
            await asyncio.to_thread(sensor.close)

    # -- health ----------------------------------------------------------------------------------------------

    def health(self, *, stopped: bool = False) -> list[SensorHealth]:
        """Every configured sensor's health now; rates are over the time since the last record."""
        now_ms, now = _now_ms(), time.monotonic()
        out = [dataclasses.replace(h, updated_ms=now_ms) for h in self.unavailable]
        assert self.scheduler is not None
        for config, sensor in self.live:
            status = self.scheduler.status[sensor.name]
            state = "finished" if status.ended else "stopped" if stopped else "sampling"
            out.append(self._report(config, sensor, state, status.samples, status, now_ms, now))
        for load in self.loads:
            state = "stopped" if stopped and load.state == "loading" else load.state  # a load ends at its batch
            out.append(self._report(load.config, load.sensor, state, load.samples, load, now_ms, now))
        return sorted(out, key=lambda h: h.name)

    def _report(
        self,
        config: SensorConfig,
        sensor: Sensor | PushedSensor,
        state: str,
        samples: int,
        seen: SensorStatus | _Load,
        now_ms: int,
        now: float,
    ) -> SensorHealth:
        base_samples, base_time = self._rate_base[sensor.name]
        moving = state in ("sampling", "loading") and now > base_time
        rate = (samples - base_samples) / (now - base_time) if moving else 0.0
        last = seen.last_sample
        return SensorHealth(
            sensor.name,
            config.driver,
            state,
            sensor.period_ms,
            samples,
            round(max(rate, 0.0), 3),
            None if last is None else last.t_ms,
            dict(seen.errors),
            seen.last_error,
            now_ms,
        )

    async def _record_forever(self) -> None:
        while True:
            reports = self.health()
            try:
                await asyncio.to_thread(self.store.save_health, reports)
            except Exception as exc:  # a full disk or a locked file: the next round tries again
                log.warning("sensor health not written: %s", exc)
            now = time.monotonic()
            self._rate_base.update({h.name: (h.samples, now) for h in reports if h.name in self._rate_base})
            await asyncio.sleep(self.health_interval_s)

    # -- fast replays ----------------------------------------------------------------------------------------

    async def _load(self, load: _Load) -> None:
        try:
            await asyncio.to_thread(self._load_blocking, load)
        except Exception as exc:  # e.g. the store cannot be written: say so in the health, keep the daemon up
            load.state, load.last_error = "failed", str(exc)
            log.exception("loading replay %s failed", load.sensor.name)

    def _load_blocking(self, load: _Load) -> None:
        sensor, key = load.sensor, LOAD_KEY + load.sensor.name
        self.store.register(sensor.name, sensor.channels, sensor.class_names, sensor.source)
        digest = hashlib.sha256(load.config.model_dump_json().encode()).hexdigest()
        mark = json.loads(self.store.get_meta(key) or "{}")
        if mark.get("config") != digest:  # a new or changed replay starts from its beginning
            # Stamped as if recorded at its own rate up to now: a loaded recording is past data, never future data.
            start_ms = _now_ms() - round(sensor.recorded_length() * sensor.period_ms)
            mark = {"config": digest, "start_ms": start_ms, "reads": 0, "samples": 0, "done": False}
        load.samples = int(mark["samples"])
        self._rate_base[sensor.name] = (load.samples, time.monotonic())  # a rate of this run, not of earlier ones
        if not mark["done"]:
            for _ in range(int(mark["reads"])):  # resume where the last run stopped
                with contextlib.suppress(ProtocolError):
                    sensor.read(0)
            batch: list[Sample] = []
            while not self._stopping.is_set():
                t_ms = int(mark["start_ms"]) + round(int(mark["reads"]) * sensor.period_ms)
                try:
                    sample = sensor.read(t_ms)
                    load.last_sample = sample
                except ReplayEndedError:
                    mark["done"] = True
                    break
                except ProtocolError as exc:  # a bad line: an ERROR sample, as the scheduler records it
                    load.errors[str(exc.reason)] += 1
                    load.last_error = str(exc)
                    sample = Sample.failed(sensor.name, t_ms, len(sensor.channels), str(exc))
                mark["reads"] += 1
                batch.append(sample)
                if len(batch) >= LOAD_BATCH:
                    self._commit(load, batch, key, mark)
                    batch = []
            self._commit(load, batch, key, mark)
        load.state = "loaded" if mark["done"] else "stopped"
        log.info("replay %s %s: %d samples", sensor.name, load.state, load.samples)

    def _commit(self, load: _Load, batch: list[Sample], key: str, mark: dict[str, object]) -> None:
        """Write a batch, then how far the load got (a crash in between repeats at most this batch)."""
        load.samples += self.store.write(batch) - sum(1 for s in batch if s.error is not None)
        mark["samples"] = load.samples
        self.store.set_meta(key, json.dumps(mark))


@contextlib.asynccontextmanager
async def open_collection(
    configs: Sequence[SensorConfig], store_config: SampleStoreConfig, health_interval_s: float = 5.0
) -> AsyncIterator[SampleCollection]:
    """The store opened (with its retention) and every sensor of `configs` collected into it while the block runs;
    the store is closed after the last sample is written."""
    store = await asyncio.to_thread(store_config.open)
    try:
        async with SampleCollection(configs, store, health_interval_s=health_interval_s) as collection:
            yield collection
    finally:
        await asyncio.to_thread(store.close)
