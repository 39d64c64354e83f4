"""Scale-out against real processes: two screening workers on an MQTT 5 shared subscription feed the sequencer.

Mosquitto, `coordinator serve` (ingest.workers = 2), two `coordinator ingest-worker` processes and three agents.
One worker is SIGKILLed mid-stream and restarted later: every report is in the ledger exactly once and every agent
holds a verified receipt for each. A hand-off with a forged tag changes nothing.
"""

from __future__ import annotations

import json
import re

import paho.mqtt.client as paho
import pytest
from mqtt_fixtures import (
    AgentHandle,
    MessagingStack,
    MosquittoProcess,
    ServiceProcess,
    contribution_report,
    wait_until,
    write_bodies,
)
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.ingest.handoff import VerifiedBatch, seal_verified, verified_topic
from protocol.envelope import peek_envelope

pytest_plugins = ["mqtt_fixtures"]

REPORTS = 1500


def _start_worker(stack: MessagingStack, worker_id: str) -> ServiceProcess:
    worker = ServiceProcess(
        f"worker-{worker_id}",
        ["coordinator", "ingest-worker", "--config", str(stack.config), "--worker-id", worker_id],
        stack.root / f"worker-{worker_id}.log",
    )
    starts = worker.log_text().count("connected to broker")
    worker.start()

    def connected() -> bool:
        if not worker.alive:
            raise RuntimeError(f"worker {worker_id} exited:\n{worker.log_text()[-4000:]}")
        # Two connections: device messages (shared subscription) and commit notices.
        return worker.log_text().count("connected to broker") >= starts + 2

    wait_until(connected, 60, f"worker {worker_id} connected")
    return worker


def _forwarded_to(broker_log: str, client_id: str) -> int:
    """Device messages the broker delivered to one worker (mosquitto -v logs every PUBLISH it sends)."""
    return len(
        re.findall(rf"Sending PUBLISH to {re.escape(client_id)} \(d\d, q1, r0, m\d+, 'mid/[^']+/up/", broker_log)
    )


@pytest.mark.slow
def test_two_workers_and_a_sigkilled_one_lose_and_duplicate_nothing(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    # A small in-flight window, so that it is full of reports awaiting their commit while commit notices must still
    # get through (they once queued behind those reports: a deadlock).
    stack.coordinator_extra = "workers = 2\nreceive_maximum = 100\nqueue_max = 200"
    broker = stack.start_broker()
    stack.start_coordinator()
    workers = [_start_worker(stack, "w1"), _start_worker(stack, "w2")]
    try:
        agents = [stack.enrol_agent(n) for n in ("ana", "ben", "cai")]
        for a in agents:
            stack.take_invitation(a)
        written = write_bodies(agents, REPORTS)
        for a in agents:
            stack.start_agent(a)

        wait_until(lambda: len(stack.ledger_contributions()) >= 300, 60, "300 reports in the ledger", poll_s=0.1)
        workers[0].kill()
        at_kill = len(stack.ledger_contributions())
        assert at_kill < REPORTS, "the kill must land mid-stream for this test to mean anything"
        # The surviving worker keeps the ledger growing on its own.
        wait_until(lambda: len(stack.ledger_contributions()) >= at_kill + 200, 60, "progress with one worker")
        workers[0] = _start_worker(stack, "w1")

        def all_receipted(agents: list[AgentHandle] = agents) -> bool:
            return all(a.spool_left() == 0 and a.outbox_counts() == (0, len(written[a.device])) for a in agents)

        wait_until(all_receipted, 90, "every report receipted by its agent", poll_s=0.2)

        leaves = stack.ledger_contributions()
        logged = [json.loads(peek_envelope(env)[1])["update_sha256"] for _, _, env in leaves]
        assert len(logged) == REPORTS
        assert set(logged) == set().union(*written.values())
        assert len({(kid, seq) for kid, seq, _ in leaves}) == REPORTS
        # Both workers screened device traffic; the sequencer verified none itself (it subscribes to no up topic).
        log = broker.log_text()
        assert _forwarded_to(log, "midgate-coordinator-worker-w1") > 0
        assert _forwarded_to(log, "midgate-coordinator-worker-w2") > 0
        assert _forwarded_to(log, "midgate-coordinator") == 0
        assert stack.metric("midgate_ingest_accepted_total") == REPORTS

        # A hand-off with a forged tag (wrong key) carrying a copy of a logged envelope with a new seq is refused.
        size_before = stack.ledger_size()
        refused_before = stack.metric("midgate_ingest_rejected_total", 'reason="bad_signature"')
        _, _, envelope = leaves[0]
        topic, payload = seal_verified(
            b"\x00" * 32, stack.mid, VerifiedBatch("w2", 1, [(f"mid/{stack.mid}/dev/x/up/report", envelope)])
        )
        assert topic == verified_topic(stack.mid, "w2")
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="forger", protocol=paho.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.publish(topic, payload, qos=1).wait_for_publish(10)
        finally:
            client.disconnect()
            client.loop_stop()
        wait_until(
            lambda: stack.metric("midgate_ingest_rejected_total", 'reason="bad_signature"') == refused_before + 1,
            20,
            "the forged hand-off refused",
        )
        assert stack.ledger_size() == size_before

        # Every worker, the restarted one included, got its commit notices: nothing left waiting at shutdown (a worker
        # stuck with unacknowledged reports passes the checks above only because the agents resend to the other).
        for w in workers:
            w.stop()
            stopped = [json.loads(line) for line in w.log_text().splitlines() if '"worker stopped"' in line]
            assert stopped, f"{w.name} logged no shutdown counts"
            assert stopped[-1]["awaiting_commit"] == 0
            assert stopped[-1]["committed"] > 0
    except BaseException:
        for w in workers:
            print(f"---- {w.name} log (tail) ----\n{w.log_text()[-6000:]}")
        raise
    finally:
        for w in workers:
            w.stop()


@pytest.mark.slow
def test_reports_held_by_a_sigkilled_worker_come_back_through_its_session_without_any_resend(
    messaging_stack: MessagingStack,
) -> None:
    """No agent outbox to hide a loss: a bare client publishes each pre-signed report exactly once, a worker is
    SIGKILLed mid-stream and restarted, and every report still reaches the ledger: what the dead worker held
    unacknowledged is redelivered to it on its resumed persistent session. (This does not isolate ack-after-commit:
    a worker acking right after its hand-off would pass too, because the hand-off itself survives a worker kill.)"""
    from protocol.topics import UpKind, up_topic

    stack = messaging_stack
    stack.coordinator_extra = "workers = 2\nreceive_maximum = 100\nqueue_max = 200"
    broker = stack.start_broker()
    stack.start_coordinator()
    workers = [_start_worker(stack, "w1"), _start_worker(stack, "w2")]
    try:
        total = 2000
        envelopes = _bare_device_reports(stack, total)
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bare-publisher", protocol=paho.MQTTv5)
        client.max_inflight_messages_set(200)
        client.max_queued_messages_set(0)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            topic = up_topic(stack.mid, "d-bare", UpKind.REPORT)
            infos = [client.publish(topic, envelope, qos=1) for envelope in envelopes]
            wait_until(lambda: len(stack.ledger_contributions()) >= 300, 60, "300 reports in the ledger", poll_s=0.05)
            workers[0].kill()
            assert len(stack.ledger_contributions()) < total, "the kill must land mid-stream"
            for info in infos:
                info.wait_for_publish(60)
        finally:
            client.disconnect()
            client.loop_stop()
        workers[0] = _start_worker(stack, "w1")
        wait_until(lambda: len(stack.ledger_contributions()) == total, 60, "every report in the ledger", poll_s=0.2)
        leaves = stack.ledger_contributions()
        assert sorted(seq for _, seq, _ in leaves) == list(range(1, total + 1))
    except BaseException:
        for w in workers:
            print(f"---- {w.name} log (tail) ----\n{w.log_text()[-6000:]}")
        raise
    finally:
        for w in workers:
            w.stop()


@pytest.mark.slow
def test_workers_acknowledge_device_messages_only_after_the_sequencer_committed_them(
    messaging_stack: MessagingStack,
) -> None:
    """With the sequencer frozen (SIGSTOP), the workers screen and hand over every report, yet the broker receives
    no acknowledgement of a device message from them; after the sequencer resumes and commits, it receives all."""
    import os
    import signal

    stack = messaging_stack
    stack.coordinator_extra = "workers = 2"
    broker = stack.start_broker()
    sequencer = stack.start_coordinator()
    workers = [_start_worker(stack, "w1"), _start_worker(stack, "w2")]
    assert sequencer.proc is not None
    total = 300
    envelopes = _bare_device_reports(stack, total)
    device_acks = re.compile(r"Received PUBACK from midgate-coordinator-worker-w\d \(Mid")
    os.kill(sequencer.proc.pid, signal.SIGSTOP)
    try:
        _check_no_ack_before_commit(stack, broker, workers, sequencer.proc.pid, envelopes, device_acks)
        wait_until(lambda: len(stack.ledger_contributions()) == total, 60, "every report in the ledger", poll_s=0.2)
        wait_until(lambda: len(device_acks.findall(broker.log_text())) >= total, 60, "every report acknowledged")
        assert sorted(seq for _, seq, _ in stack.ledger_contributions()) == list(range(1, total + 1))
    except BaseException:
        for w in workers:
            print(f"---- {w.name} log (tail) ----\n{w.log_text()[-6000:]}")
        raise
    finally:
        os.kill(sequencer.proc.pid, signal.SIGCONT)
        for w in workers:
            w.stop()


def _check_no_ack_before_commit(
    stack: MessagingStack,
    broker: MosquittoProcess,
    workers: list[ServiceProcess],
    sequencer_pid: int,
    envelopes: list[bytes],
    device_acks: re.Pattern[str],
) -> None:
    """Publish while the sequencer is frozen, require no worker ack, then let the sequencer resume."""
    import os
    import signal

    from protocol.topics import UpKind, up_topic

    total = len(envelopes)
    handoffs = re.compile(
        r"Received PUBLISH from midgate-coordinator-worker-w\d-handoff \(d\d, q1, r0, m\d+, '([^']+)'"
    )
    delivered = re.compile(r"Sending PUBLISH to midgate-coordinator-worker-w\d \(d\d, q1, r0, m\d+, 'mid/[^']+/up/")
    try:
        _publish_once(broker, up_topic(stack.mid, "d-bare", UpKind.REPORT), envelopes)

        def handed_over() -> bool:
            log = broker.log_text()
            return len(delivered.findall(log)) >= total and len(handoffs.findall(log)) >= 2

        wait_until(handed_over, 60, "every report delivered to a worker and handed over", poll_s=0.1)
        # Give the workers every chance to (wrongly) acknowledge: their counts show all reports forwarded.
        wait_until(
            lambda: sum(w.log_text().count('"forwarded":') for w in workers) > 0, 30, "worker counts", poll_s=0.2
        )
        assert len(stack.ledger_contributions()) == 0
        assert device_acks.findall(broker.log_text()) == [], "a worker acknowledged a report before its commit"
    finally:
        os.kill(sequencer_pid, signal.SIGCONT)


def _bare_device_reports(stack: MessagingStack, total: int) -> list[bytes]:
    """Enrol device d-bare straight into the registry and sign reports seq 1..total with its key (no agent)."""
    from coordinator.registry.store import Registry
    from protocol.identity import SignerKey

    key = SignerKey.generate("d-bare")
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        registry.add_invite("inv-bare", "m-bare", 0, 2**40)
        registry.redeem_invite("inv-bare", 1, "d-bare", key.verifier, "$7$101$unused$unused")
    finally:
        registry.close()
    return [contribution_report(i, "d-bare", i + 1, 1_790_000_000_000).seal(key) for i in range(total)]


def _publish_once(broker: MosquittoProcess, topic: str, envelopes: list[bytes]) -> None:
    """Publish each envelope once at QoS 1 from a plain MQTT 5 client (no agent, so nothing is resent)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bare-publisher", protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for info in [client.publish(topic, envelope, qos=1) for envelope in envelopes]:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


_W1_HANDOFFS = re.compile(r"Received PUBLISH from midgate-coordinator-worker-w1-handoff \(d\d, q1, r0, m\d+, '")
_W1_DELIVERIES = re.compile(r"Sending PUBLISH to midgate-coordinator-worker-w1 \(d\d, q1, r0, m\d+, 'mid/[^']+/up/")
_W1_DEVICE_ACKS = re.compile(r"Received PUBACK from midgate-coordinator-worker-w1 \(Mid")


def _publish_to_frozen_sequencer(stack: MessagingStack, broker: MosquittoProcess, total: int) -> None:
    """Register device d-bare, publish `total` reports once, and wait until worker w1 received them all and handed
    at least one batch over (which the frozen sequencer cannot answer)."""
    from protocol.topics import UpKind, up_topic

    envelopes = _bare_device_reports(stack, total)
    _publish_once(broker, up_topic(stack.mid, "d-bare", UpKind.REPORT), envelopes)
    wait_until(lambda: len(_W1_HANDOFFS.findall(broker.log_text())) >= 1, 60, "a hand-off from w1", poll_s=0.1)
    wait_until(lambda: len(_W1_DELIVERIES.findall(broker.log_text())) >= total, 60, "every report sent to w1")


def _shutdown_counts(worker: ServiceProcess) -> dict[str, int]:
    stopped = [json.loads(line) for line in worker.log_text().splitlines() if '"worker stopped"' in line]
    assert stopped, f"{worker.name} logged no shutdown counts"
    counts: dict[str, int] = stopped[-1]
    return counts


@pytest.mark.slow
def test_a_stopping_worker_waits_bounded_for_commit_notices_then_exits_with_its_counts(
    messaging_stack: MessagingStack,
) -> None:
    """SIGTERM while the sequencer is frozen (SIGSTOP): the worker's hand-offs can get no commit notice, so its drain
    gives up after min(handoff_timeout_s, DRAIN_MAX_S), says so, and exits by itself (not by the fixture's SIGKILL)
    logging the reports it leaves unacknowledged in its session. Its 20 slots are all held by those reports while
    the broker has sent it hundreds more (Receive Maximum 1,000): paho's thread waits for a slot, and once stopping it
    must drop each of the rest at once (it used to wait 0.5 s for each: about a minute, past the 15 s SIGTERM grace)."""
    import os
    import signal

    stack = messaging_stack
    stack.coordinator_extra = "workers = 2\nhandoff_timeout_s = 3.0\nqueue_max = 20\nreceive_maximum = 1000"
    broker = stack.start_broker()
    sequencer = stack.start_coordinator()
    assert sequencer.proc is not None
    worker = _start_worker(stack, "w1")
    os.kill(sequencer.proc.pid, signal.SIGSTOP)
    try:
        _publish_to_frozen_sequencer(stack, broker, 300)
        worker.stop()
        assert worker.proc is not None and worker.proc.returncode == 0, "the worker did not exit by itself"
        assert "stopping without the commit notices" in worker.log_text()
        counts = _shutdown_counts(worker)
        assert counts["committed"] == 0
        assert counts["awaiting_commit"] == counts["forwarded"] > 0
    except BaseException:
        print(f"---- {worker.name} log (tail) ----\n{worker.log_text()[-6000:]}")
        raise
    finally:
        os.kill(sequencer.proc.pid, signal.SIGCONT)
        worker.stop()


@pytest.mark.slow
def test_a_stopping_worker_acknowledges_what_is_committed_during_its_drain(messaging_stack: MessagingStack) -> None:
    """SIGTERM while the sequencer is frozen, then the sequencer resumes: the draining worker gets the commit notices,
    acknowledges every report it handed over to the broker (the PUBACKs go out ahead of its DISCONNECT) and stops
    with nothing awaiting its commit. This is the race that made the fault tests fail about once in six runs."""
    import os
    import signal

    stack = messaging_stack
    stack.coordinator_extra = "workers = 2"
    broker = stack.start_broker()
    sequencer = stack.start_coordinator()
    assert sequencer.proc is not None
    worker = _start_worker(stack, "w1")
    assert worker.proc is not None
    os.kill(sequencer.proc.pid, signal.SIGSTOP)
    try:
        _publish_to_frozen_sequencer(stack, broker, 50)
        os.kill(worker.proc.pid, signal.SIGTERM)
        wait_until(lambda: "draining:" in worker.log_text(), 30, "the worker draining")
        os.kill(sequencer.proc.pid, signal.SIGCONT)
        worker.proc.wait(timeout=30)
        assert worker.proc.returncode == 0
        assert "stopping without the commit notices" not in worker.log_text()
        counts = _shutdown_counts(worker)
        assert counts["awaiting_commit"] == 0
        assert counts["committed"] == counts["forwarded"] > 0
        assert len(_W1_DEVICE_ACKS.findall(broker.log_text())) == counts["committed"]
    except BaseException:
        print(f"---- {worker.name} log (tail) ----\n{worker.log_text()[-6000:]}")
        raise
    finally:
        os.kill(sequencer.proc.pid, signal.SIGCONT)
        worker.stop()
