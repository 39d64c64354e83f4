"""Sensor layer figures: sample-store ingest rate, scheduler jitter at 100 Hz x 10 sensors, CPU per 1,000 samples/s.

Run: .venv/bin/python bench/sensors_bench.py            (about one minute on a small machine)

Each figure is printed next to a baseline measured in the same run:
- ingest: SampleStore.write (validation, float32 packing, one transaction per batch, retention check) against
  (a) "raw executemany": the same pre-packed rows inserted with one executemany per batch into the same schema,
  which is the floor of what SQLite can do here, and (b) "unbatched": one commit per sample, what a naive store does.
- jitter: the scheduler's lateness per tick against "naive sleep loop" (await asyncio.sleep(period) after each
  read), whose error accumulates as drift.
- CPU: process CPU seconds per wall second while sampling, divided by the sample rate in thousands.
Targets from issue 4: ingest >= 50,000 samples/s on one core; p99 jitter < 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sqlite3
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.sensors.sample import Sample
from edge.sensors.scheduler import SamplingScheduler
from edge.sensors.simulated import SimulatedEnvironmentSensor
from edge.sensors.store import Retention, SampleStore

T0 = 1_764_115_200_000


def make_samples(n: int) -> list[Sample]:
    sensor = SimulatedEnvironmentSensor("env", device="bench", dropout=0)
    one = sensor.read(T0).values
    return [Sample("env", T0 + 10 * k, one) for k in range(n)]


def bench_ingest(folder: Path, n: int, batch: int) -> dict[str, float]:
    samples = make_samples(n)
    batches = [samples[i : i + batch] for i in range(0, n, batch)]
    store = SampleStore(folder / "store.db", retention=Retention(max_age_ms=90 * 86_400_000, max_bytes=2 * 1024**3))
    store.register("env", SimulatedEnvironmentSensor.channels)
    wall, cpu = time.perf_counter(), time.process_time()
    for b in batches:
        store.write(b)
    store_wall, store_cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert store.count() == n
    store.close()

    raw = SampleStore(folder / "raw.db")  # same schema and pragmas
    raw.register("env", SimulatedEnvironmentSensor.channels)
    raw.close()
    db = sqlite3.connect(folder / "raw.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    pack = struct.Struct("<5f")
    rows = [[(1, s.t_ms, 0, None, None, pack.pack(*s.values), None) for s in b] for b in batches]
    wall = time.perf_counter()
    for r in rows:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO samples(sensor_id, t_ms, quality, label, segment, value, error) VALUES(?,?,?,?,?,?,?)", r
        )
        db.execute("COMMIT")
    raw_wall = time.perf_counter() - wall
    db.close()

    unbatched_n = min(n, 3000)
    single = SampleStore(folder / "single.db")
    single.register("env", SimulatedEnvironmentSensor.channels)
    wall = time.perf_counter()
    for s in samples[:unbatched_n]:
        single.write([s])
    single_wall = time.perf_counter() - wall
    single.close()
    return {
        "store": n / store_wall,
        "store_cpu": n / store_cpu,
        "raw": n / raw_wall,
        "unbatched": unbatched_n / single_wall,
    }


def bench_scheduler(folder: Path, sensors: int, hz: float, seconds: float) -> dict[str, float]:
    store = SampleStore(folder / "sched.db")
    fleet = [SimulatedEnvironmentSensor(f"env{i}", device=f"d{i}", period_ms=1000.0 / hz) for i in range(sensors)]

    async def run() -> SamplingScheduler:
        async with SamplingScheduler(fleet, store, backoff_initial_s=0.01) as scheduler:
            await asyncio.sleep(seconds)
        return scheduler

    wall, cpu = time.perf_counter(), time.process_time()
    scheduler = _run(run())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    lateness = np.concatenate([np.array(s.lateness_ns, dtype=np.float64) for s in scheduler.status.values()]) / 1e6
    samples = sum(s.samples + s.failures for s in scheduler.status.values())
    skipped = sum(s.skipped_ticks for s in scheduler.status.values())
    store.close()
    rate = samples / wall
    return {
        "p50": float(np.percentile(lateness, 50)),
        "p99": float(np.percentile(lateness, 99)),
        "max": float(lateness.max()),
        "rate": rate,
        "cpu_pct": 100.0 * cpu / wall,
        "cpu_per_k": 100.0 * cpu / wall / (rate / 1000.0),
        "skipped_pct": 100.0 * skipped / max(samples + skipped, 1),
    }


def bench_naive(sensors: int, hz: float, seconds: float) -> dict[str, float]:
    """Baseline: sleep one period after each read; lateness is measured against the ideal grid, so drift shows."""
    period = 1.0 / hz
    fleet = [SimulatedEnvironmentSensor(f"env{i}", device=f"d{i}", period_ms=1000.0 * period) for i in range(sensors)]
    lateness: list[float] = []

    async def loop(sensor: SimulatedEnvironmentSensor, start: float) -> None:
        k = 0
        while True:
            lateness.append((time.monotonic() - (start + k * period)) * 1000.0)
            with contextlib.suppress(Exception):
                sensor.read(int(time.time() * 1000))
            k += 1
            await asyncio.sleep(period)

    async def run() -> None:
        start = time.monotonic()
        tasks = [asyncio.create_task(loop(s, start)) for s in fleet]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    _run(run())
    arr = np.array(lateness)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def bench_floor(sensors: int, hz: float, seconds: float) -> dict[str, float]:
    """Baseline: the event loop's own timer floor on this machine right now: tasks that sleep to absolute, staggered
    deadlines (the scheduler's timing) but read nothing and store nothing."""
    period_ns = int(1e9 / hz)
    lateness: list[float] = []

    async def loop(start: int) -> None:
        k = 0
        while True:
            due = start + k * period_ns
            delay = due - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            lateness.append((time.monotonic_ns() - due) / 1e6)
            k += 1

    async def run() -> None:
        start = time.monotonic_ns()
        tasks = [asyncio.create_task(loop(start + i * period_ns // sensors)) for i in range(sensors)]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    _run(run())
    arr = np.array(lateness)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max())}


def _run(coro):  # type: ignore[no-untyped-def]
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the simulated dropouts would log; they are part of the load, not output
    print(f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs")
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ing = bench_ingest(folder, args.samples, args.batch)
        print(f"\ningest of {args.samples:,} samples (5 channels) in batches of {args.batch}, one thread:")
        print(
            f"  SampleStore.write          {ing['store']:>10,.0f} samples/s  ({ing['store_cpu']:,.0f} per CPU-second)"
        )
        print(
            f"  baseline raw executemany   {ing['raw']:>10,.0f} samples/s  store/raw = {ing['store'] / ing['raw']:.2f}"
        )
        ratio = ing["store"] / ing["unbatched"]
        print(f"  baseline unbatched commits {ing['unbatched']:>10,.0f} samples/s  store/unbatched = {ratio:.1f}x")
        print(f"  target >= 50,000 samples/s: {'PASS' if ing['store'] >= 50_000 else 'FAIL'}")

        sched = bench_scheduler(folder, 10, 100.0, args.seconds)
        floor = bench_floor(10, 100.0, args.seconds)
        naive = bench_naive(10, 100.0, args.seconds)
        print(f"\n10 sensors at 100 Hz for {args.seconds:.0f} s, lateness of each tick behind its due time:")
        rows = (
            ("SamplingScheduler", sched),
            ("baseline loop floor", floor),
            ("baseline naive sleep", naive),
        )
        for label, r in rows:
            print(f"  {label:<21} p50 {r['p50']:8.3f} ms  p99 {r['p99']:8.3f} ms  max {r['max']:8.1f} ms")
        print(f"  scheduler p99 / floor p99 = {sched['p99'] / max(floor['p99'], 1e-9):.2f}")
        print(f"  naive p99 / scheduler p99 = {naive['p99'] / max(sched['p99'], 1e-9):.0f}x (naive drifts)")
        print(f"  ticks skipped by the scheduler: {sched['skipped_pct']:.2f} %")
        print(f"  target p99 < 5 ms: {'PASS' if sched['p99'] < 5.0 else 'FAIL'}")
        print(f"\nCPU while sampling {sched['rate']:,.0f} samples/s incl. store writes: {sched['cpu_pct']:.1f} %")
        print(f"  = {sched['cpu_per_k']:.1f} % of one core per 1,000 samples/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
