"""Prometheus metrics of the ingest service, in the service's own registry (no process-global state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


def _registry() -> CollectorRegistry:
    return CollectorRegistry(auto_describe=True)


@dataclass
class IngestMetrics:
    registry: CollectorRegistry = field(default_factory=_registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter("midgate_ingest_received", "MQTT messages received", registry=r)
        self.accepted = Counter("midgate_ingest_accepted", "reports appended to the ledger", registry=r)
        self.rejected = Counter("midgate_ingest_rejected", "messages rejected, by reason code", ["reason"], registry=r)
        self.dedup_hits = Counter("midgate_ingest_dedup_hits", "identical resends of logged reports", registry=r)
        self.heartbeats = Counter("midgate_ingest_heartbeats", "verified heartbeats", registry=r)
        self.receipts = Counter("midgate_ingest_receipts_published", "receipts published", registry=r)
        self.batch_size = Histogram(
            "midgate_ingest_batch_size",
            "reports per ledger commit",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=r,
        )
        self.latency = Histogram(
            "midgate_ingest_latency_seconds",
            "receive to receipt published",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.ledger_size = Gauge("midgate_ledger_size", "leaves in the ledger", registry=r)
        self.queue_depth = Gauge("midgate_ingest_queue_depth", "received messages not yet acknowledged", registry=r)
        self.devices_online = Gauge("midgate_devices_online", "devices heard from recently", registry=r)


@dataclass
class WorkerMetrics:
    """A screening worker's metrics (`ingest-worker --metrics-port`): the screening counters under the same names as
    `serve`'s (so one dashboard sums them over the fleet; scrape labels tell the workers apart) plus the hand-off."""

    registry: CollectorRegistry = field(default_factory=_registry)

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter("midgate_ingest_received", "MQTT messages received", registry=r)
        self.rejected = Counter("midgate_ingest_rejected", "messages rejected, by reason code", ["reason"], registry=r)
        self.heartbeats = Counter("midgate_ingest_heartbeats", "verified heartbeats", registry=r)
        self.forwarded = Counter("midgate_worker_forwarded", "verified messages handed to the sequencer", registry=r)
        self.committed = Counter(
            "midgate_worker_committed", "device messages acknowledged after their commit notice", registry=r
        )
        self.redeliveries = Counter(
            "midgate_worker_redeliveries", "messages given up without a commit notice and redelivered", registry=r
        )
        self.awaiting_commit = Gauge("midgate_worker_awaiting_commit", "handed over, no commit notice yet", registry=r)
        self.queue_depth = Gauge("midgate_ingest_queue_depth", "received messages not yet acknowledged", registry=r)
