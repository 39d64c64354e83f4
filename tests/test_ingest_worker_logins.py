"""Screening workers on their own broker logins (`ingest.worker_ids`), against a real Mosquitto configured by
`midgate coordinator broker-config` (password file + ACL, no anonymous access).

Two workers screen real agents' reports into the ledger through their shared subscription; then a client holding
worker w1's password tries what a stolen worker login would: write a commit notice, write w2's hand-off topic,
write a device's `up` topic, read w2's commit notices. The broker refuses each, while w1's own hand-off topic is
writable (the sequencer's HMAC check is the next line of defence there).
"""

from __future__ import annotations

import json

import pytest
from mqtt_fixtures import MessagingStack, MosquittoProcess, coordinator_toml, free_port, wait_until, write_bodies
from test_ingest_workers import _start_worker
from test_messaging_broker import DeviceClient
from typer.testing import CliRunner

from coordinator.broker.logins import worker_password_path
from coordinator.cli import app as coordinator_app
from coordinator.config import CoordinatorSettings
from coordinator.ingest.handoff import committed_topic, seal_committed, verified_topic
from protocol.envelope import peek_envelope
from protocol.topics import UpKind, up_topic

pytest_plugins = ["mqtt_fixtures"]

NOT_AUTHORIZED = 135  # MQTT 5 reason code
REPORTS = 200


@pytest.mark.slow
def test_each_worker_has_its_own_login_limited_to_its_own_topics(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    broker_dir = stack.root / "coordinator" / "broker"
    local_port = free_port()
    extra = 'workers = 2\nworker_ids = ["w1", "w2"]\nhandoff_timeout_s = 5.0'
    # The pid file lets `serve` SIGHUP the broker after an enrolment rewrote the password file.
    broker_extra = f'pid_file = "{broker_dir / "mosquitto.pid"}"'
    toml = coordinator_toml(stack.data_dir, stack.mid, local_port, stack.http_port, extra, broker_extra)
    stack.config.write_text(
        toml.replace(
            "[broker_config]\n",
            # Mosquitto runs as root here: its `mosquitto` user cannot enter pytest's private folders.
            f'[broker_config]\nlocal_port = {local_port}\nlisten_host = "127.0.0.1"\nuser = "root"\n',
        )
    )
    settings = CoordinatorSettings.load(stack.config)
    workers = []
    try:
        result = CliRunner().invoke(coordinator_app, ["broker-config", "--no-tls", "--config", str(stack.config)])
        assert result.exit_code == 0, result.output
        acl = (broker_dir / "acl").read_text()
        assert f"user ingest.w1\ntopic read mid/{stack.mid}/dev/+/up/#\n" in acl
        users = [line.split(":")[0] for line in (broker_dir / "passwords").read_text().splitlines()]
        assert sorted(users) == ["coordinator", "ingest.w1", "ingest.w2"]
        for w in ("w1", "w2"):
            assert worker_password_path(settings, w).stat().st_mode & 0o077 == 0

        conf = (broker_dir / "mosquitto.conf").read_text()
        stack.broker = MosquittoProcess(broker_dir, conf, local_port)
        stack.broker.start()
        stack.start_coordinator()
        workers = [_start_worker(stack, "w1"), _start_worker(stack, "w2")]
        log = stack.broker.log_text()
        assert "as midgate-coordinator-worker-w1 (p5, c0, k30, u'ingest.w1')" in log
        assert "as midgate-coordinator-worker-w2 (p5, c0, k30, u'ingest.w2')" in log

        agent = stack.enrol_agent("ana")
        stack.take_invitation(agent)  # the invitation with the coordinator's own login
        hashes = write_bodies([agent], REPORTS)[agent.device]
        stack.start_agent(agent)
        wait_until(lambda: agent.outbox_counts() == (0, REPORTS), 60, "every report receipted", poll_s=0.2)
        leaves = stack.ledger_contributions()
        assert {json.loads(peek_envelope(env)[1])["update_sha256"] for _, _, env in leaves} == hashes
        assert len(leaves) == REPORTS
        # Both workers screened through their own logins (the sequencer subscribes to no device topic).
        assert "Sending PUBLISH to midgate-coordinator-worker-w1 (" in stack.broker.log_text()
        assert "Sending PUBLISH to midgate-coordinator-worker-w2 (" in stack.broker.log_text()

        w1_password = worker_password_path(settings, "w1").read_text().strip()
        thief = DeviceClient(local_port, "ingest.w1", w1_password, None)
        try:
            assert thief.connack == [0]
            notice_topic, notice = seal_committed(b"\x00" * 32, stack.mid, "w1", 1)
            assert thief.publish(notice_topic, notice) == NOT_AUTHORIZED
            assert thief.publish(committed_topic(stack.mid, "w2"), notice) == NOT_AUTHORIZED
            assert thief.publish(verified_topic(stack.mid, "w2"), b"x" * 40) == NOT_AUTHORIZED
            assert thief.publish(up_topic(stack.mid, agent.device, UpKind.REPORT), b"{}") == NOT_AUTHORIZED
            # Its own hand-off topic is writable; the sequencer refuses the untagged bytes (the HMAC check).
            assert thief.publish(verified_topic(stack.mid, "w1"), b"x" * 40) == 0
            # Subscribing to w2's notices is granted by Mosquitto but nothing is delivered (read ACL per message).
            thief.client.subscribe(committed_topic(stack.mid, "w2"), qos=1)
            wait_until(lambda: len(thief.subacks) == 1, 10, "SUBACK")
            write_bodies([agent], 20, first=REPORTS)
            wait_until(lambda: agent.outbox_counts() == (0, REPORTS + 20), 60, "20 more receipted", poll_s=0.2)
            assert "Sending PUBLISH to midgate-coordinator-worker-w2-handoff" in stack.broker.log_text()
            assert not [t for t in thief.received if "/committed/" in t]
        finally:
            thief.close()
        assert len(stack.ledger_contributions()) == REPORTS + 20
    except BaseException:
        for w in workers:
            print(f"---- {w.name} log (tail) ----\n{w.log_text()[-6000:]}")
        raise
    finally:
        for w in workers:
            w.stop()
