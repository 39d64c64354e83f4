"""Refused messages by reason over time: `serve` samples its refusal counters once a minute (`RefusalHistory.run`)
and the dashboard charts the last day of samples. Kept in memory only, as the counters are: a restart starts both
again from zero (the log lines of every refusal stay, docs/protocol.md "Rejections are counted and logged")."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

SAMPLE_EVERY_S = 60.0
KEEP_SAMPLES = 24 * 60


def refusal_totals(metrics: CollectorRegistry) -> dict[str, float]:
    """reason -> refusals counted since the process started (`midgate_ingest_rejected_total`)."""
    found: dict[str, float] = {}
    for family in metrics.collect():
        if family.name != "midgate_ingest_rejected":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                reason = sample.labels.get("reason", "?")
                found[reason] = found.get(reason, 0.0) + sample.value
    return found


@dataclass
class RefusalHistory:
    """Samples of the refusal totals, (ms, reason -> count), oldest first, at most KEEP_SAMPLES."""

    metrics: CollectorRegistry
    clock_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    samples: deque[tuple[int, dict[str, float]]] = field(default_factory=lambda: deque(maxlen=KEEP_SAMPLES))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> None:
        totals = refusal_totals(self.metrics)
        with self._lock:
            self.samples.append((self.clock_ms(), totals))

    def snapshot(self) -> list[tuple[int, dict[str, float]]]:
        with self._lock:
            return list(self.samples)

    async def run(self, stopped: asyncio.Event, period_s: float = SAMPLE_EVERY_S) -> None:
        """Sample until `stopped` is set: once at once, then every `period_s`."""
        while not stopped.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), timeout=period_s)
