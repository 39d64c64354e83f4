"""The ingest service in-process against a real Mosquitto, with storage failures injected around the ledger commit:
the service keeps running, the failed batches are redelivered by the broker, and the ledger ends exactly right."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import paho.mqtt.client as paho
from mqtt_fixtures import MosquittoProcess, contribution_report
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.config import CoordinatorSettings
from coordinator.ingest.pipeline import Candidate, Verdict
from coordinator.registry.store import Registry
from coordinator.serve.assembly import CoordinatorProcess
from protocol.identity import SignerKey
from protocol.topics import UpKind, up_topic

pytest_plugins = ["mqtt_fixtures"]
REPORTS = 60


def test_failed_commits_are_redelivered_and_logged_exactly_once(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    settings = CoordinatorSettings.load(
        None,
        mid="riverside",
        data_dir=tmp_path / "coordinator",
        broker={"port": mosquitto.port},
        enrolment={"enabled": False},
        ingest={"batch_window_ms": 20, "batch_max": 25},
    )
    key = SignerKey.generate("d-one")
    registry = Registry(settings.registry_path)
    registry.add_invite("i1", "m1", 1, 2**40)
    registry.redeem_invite("i1", 2, "d-one", key.verifier, "unused")
    registry.close()
    now = int(time.time() * 1000)
    envelopes = [contribution_report(i, "d-one", i + 1, now).seal(key) for i in range(REPORTS)]
    failures: list[str] = []
    resends: list[int] = []

    async def scenario() -> tuple[int, float]:
        async with CoordinatorProcess(settings) as process:
            service = process.ingest
            original = service.pipeline.commit

            def failing_commit(candidates: list[Candidate], now_ms: int) -> list[Verdict]:
                if len(failures) == 0:
                    failures.append("before append")
                    raise OSError("disk I/O error (injected before the ledger append)")
                verdicts = original(candidates, now_ms)
                if len(failures) == 1:
                    failures.append("after append")
                    raise OSError("disk I/O error (injected after the ledger append)")
                return verdicts

            service.pipeline.commit = failing_commit  # type: ignore[method-assign]
            start = service.ledger.size  # the POLICY leaf serve logs when it starts
            runner = asyncio.create_task(service.run())
            publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id="pub", protocol=paho.MQTTv5)
            publisher.connect("127.0.0.1", mosquitto.port)
            publisher.loop_start()
            for envelope in envelopes:
                publisher.publish(up_topic("riverside", "d-one", UpKind.REPORT), envelope, qos=1)
            deadline = time.monotonic() + 60
            resend_at = time.monotonic() + 2
            while service.ledger.size - start < REPORTS or service.session.in_memory > 0:
                assert time.monotonic() < deadline, (service.ledger.size, service.session.in_memory, resends)
                assert not runner.done(), "the service stopped"
                # Like an agent without receipts: publish everything again. Needed because Mosquitto 2.0.11 may keep
                # messages queued for a resumed session undelivered (measured here; cf. eclipse-mosquitto#3202).
                if time.monotonic() > resend_at:
                    resends.append(len(envelopes))
                    for envelope in envelopes:
                        publisher.publish(up_topic("riverside", "d-one", UpKind.REPORT), envelope, qos=1)
                    resend_at = time.monotonic() + 2
                await asyncio.sleep(0.05)
            publisher.loop_stop()
            publisher.disconnect()
            service.stop()
            await runner
            internal = service.metrics.rejected.labels(reason="internal_error")._value.get()
            return service.ledger.size - start, internal

    size, internal = asyncio.run(scenario())
    assert failures == ["before append", "after append"]
    assert internal >= 2
    assert size == REPORTS
