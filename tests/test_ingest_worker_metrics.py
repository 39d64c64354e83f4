"""A screening worker's Prometheus metrics, and `serve`'s devices-online gauge fed by heartbeats that only the
workers see (real Mosquitto, `serve` with one worker, real agents).

Agents that send nothing but heartbeats are counted online by `serve` only through the heartbeat summaries the
worker attaches to its hand-offs: with `workers > 0`, `serve` subscribes to no device topic.
"""

from __future__ import annotations

import urllib.request

import paho.mqtt.client as paho
import pytest
from mqtt_fixtures import MessagingStack, ServiceProcess, free_port, wait_until, write_bodies
from paho.mqtt.enums import CallbackAPIVersion

from protocol.topics import UpKind, up_topic

pytest_plugins = ["mqtt_fixtures"]

REPORTS = 100


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _metric(port: int, name: str) -> float:
    return _scrape(port).get(name, 0.0)


@pytest.mark.slow
def test_worker_metrics_and_devices_online_through_heartbeat_summaries(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    stack.coordinator_extra = "workers = 1\nheartbeat_offline_s = 60"
    broker = stack.start_broker()
    stack.start_coordinator()
    port = free_port()
    worker = ServiceProcess(
        "worker-w1",
        [
            "coordinator",
            "ingest-worker",
            "--config",
            str(stack.config),
            "--worker-id",
            "w1",
            "--metrics-port",
            str(port),
        ],
        stack.root / "worker-w1.log",
    )
    worker.start()
    try:
        wait_until(lambda: worker.log_text().count("connected to broker") >= 2, 60, "worker connected")
        assert _metric(port, "midgate_worker_forwarded_total") == 0
        assert stack.metric("midgate_devices_online") == 0

        agents = [stack.enrol_agent(n) for n in ("ana", "ben")]
        for a in agents:
            stack.start_agent(a)
        # Heartbeats only: the worker verifies and settles them; serve learns of them from the worker's summaries.
        wait_until(lambda: _metric(port, "midgate_ingest_heartbeats_total") >= 2, 30, "heartbeats screened")
        wait_until(lambda: stack.metric("midgate_devices_online") == 2, 30, "serve counts both devices online")
        assert _metric(port, "midgate_worker_forwarded_total") == 0  # no report was handed over
        assert stack.metric("midgate_ingest_accepted_total") == 0

        ana = agents[0]
        stack.invite_to_run(ana)
        write_bodies([ana], REPORTS)
        wait_until(lambda: ana.outbox_counts() == (0, REPORTS), 60, "every report receipted", poll_s=0.2)
        assert len(stack.ledger_contributions()) == REPORTS
        wait_until(lambda: _metric(port, "midgate_worker_awaiting_commit") == 0, 20, "no hand-off awaiting a commit")
        metrics = _scrape(port)
        # Resends can make the worker forward a report twice (dedup answers it), never fewer than once.
        assert metrics["midgate_worker_forwarded_total"] >= REPORTS
        assert metrics["midgate_worker_committed_total"] == metrics["midgate_worker_forwarded_total"]
        assert metrics["midgate_ingest_received_total"] >= REPORTS + 2

        # One malformed message on ana's topic: the worker refuses it, counts it by reason code and logs it as serve
        # would (docs/protocol.md, "Rejections are counted and logged").
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="garbage", protocol=paho.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.publish(up_topic(stack.mid, ana.device, UpKind.REPORT), b"not json", qos=1).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()

        def rejected() -> dict[str, float]:
            return {k: v for k, v in _scrape(port).items() if k.startswith("midgate_ingest_rejected_total{")}

        wait_until(lambda: sum(rejected().values()) == 1, 20, "the malformed message counted")
        assert list(rejected()) == ['midgate_ingest_rejected_total{reason="malformed"}']
        logged = [line for line in worker.log_text().splitlines() if '"msg":"message rejected"' in line]
        assert len(logged) == 1 and '"level":"warning"' in logged[0] and '"reason":"malformed"' in logged[0]
        assert len(stack.ledger_contributions()) == REPORTS
    except BaseException:
        print(f"---- worker log (tail) ----\n{worker.log_text()[-6000:]}")
        raise
    finally:
        worker.stop()


def test_heartbeat_summary_round_trips_and_a_malformed_one_is_refused() -> None:
    from coordinator.ingest.handoff import VerifiedBatch, open_verified, seal_verified
    from protocol.errors import MalformedError, Reason

    key = b"k" * 32
    batch = VerifiedBatch("w1", 7, [], {"d-ana": 1_790_000_000_000, "d-ben": 1_790_000_000_500})
    topic, payload = seal_verified(key, "riverside", batch)
    assert open_verified(key, "riverside", topic, payload) == batch
    for seen in ({"D/+": 1}, {"d-ana": -1}, {"d-ana": "1"}, {"d-ana": True}):
        topic, payload = seal_verified(key, "riverside", VerifiedBatch("w1", 8, [], seen))  # type: ignore[arg-type]
        with pytest.raises(MalformedError) as info:
            open_verified(key, "riverside", topic, payload)
        assert info.value.reason is Reason.MALFORMED
