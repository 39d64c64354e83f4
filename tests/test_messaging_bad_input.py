"""Bad input over a real broker into a running coordinator: each kind is refused with its reason code and counted,
the ledger gains nothing from it, and an honest agent publishing at the same time is served in full."""

from __future__ import annotations

import base64
import json
import time

import paho.mqtt.client as paho
import pytest
from mqtt_fixtures import MessagingStack, contribution_report, wait_until, write_bodies
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.registry.store import Registry
from edge.agent.membership import load_membership
from protocol.identity import SignerKey
from protocol.messages import DeviceStatus, Heartbeat
from protocol.topics import UpKind, up_topic

pytest_plugins = ["mqtt_fixtures"]

HONEST_REPORTS = 300


@pytest.mark.slow
def test_bad_input_is_refused_counted_and_others_keep_being_served(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    broker = stack.start_broker()
    stack.start_coordinator()
    ana, ben, cai = (stack.enrol_agent(n) for n in ("ana", "ben", "cai"))
    ana_m, ben_m, cai_m = (load_membership(a.data_dir / "mids" / stack.mid) for a in (ana, ben, cai))
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        assert registry.revoke(ben_m.device, int(time.time() * 1000))
        registry.set_rate_limit(cai_m.device, 0.5, 5)
    finally:
        registry.close()

    stack.start_invited_agent(ana)
    write_bodies([ana], HONEST_REPORTS)

    attacker = paho.Client(CallbackAPIVersion.VERSION2, client_id="attacker", protocol=paho.MQTTv5)
    attacker.connect("127.0.0.1", broker.port)
    attacker.loop_start()
    now = int(time.time() * 1000)

    def report(key: SignerKey, device: str, seq: int) -> bytes:
        return contribution_report(10_000 + seq, device, seq, now).seal(key)

    ana_topic = up_topic(stack.mid, ana.device, UpKind.REPORT)
    forged = json.loads(report(ana_m.key, ana.device, 900_001))
    forged["payload"] = base64.b64encode(b'{"v":1}').decode()
    sent = {
        "bad_signature": [(ana_topic, json.dumps(forged).encode())],
        "unknown_key": [(ana_topic, report(SignerKey.generate(ana.device), ana.device, 900_002))],
        "revoked_key": [(up_topic(stack.mid, ben.device, UpKind.REPORT), report(ben_m.key, ben.device, 1))],
        "topic_mismatch": [(up_topic(stack.mid, cai.device, UpKind.REPORT), report(ana_m.key, ana.device, 900_003))],
        "too_large": [(ana_topic, b"{" + b"x" * 70_000 + b"}")],
        "malformed": [(ana_topic, b"{not json"), (ana_topic, b"\x00\x01")],
        "wrong_type": [
            (ana_topic, Heartbeat(seq=900_004, device_time_ms=now, status=DeviceStatus.IDLE).seal(ana_m.key))
        ],
        "bad_topic": [(f"mid/{stack.mid}/dev/{ana.device}/up/unknown-kind", b"{}")],
    }
    for messages in sent.values():
        for topic, payload in messages:
            attacker.publish(topic, payload, qos=1).wait_for_publish(10)
    cai_topic = up_topic(stack.mid, cai.device, UpKind.REPORT)
    for seq in range(1, 41):
        attacker.publish(cai_topic, report(cai_m.key, cai.device, seq), qos=1).wait_for_publish(10)

    def ana_done() -> bool:
        return ana.spool_left() == 0 and ana.outbox_counts() == (0, HONEST_REPORTS)

    wait_until(ana_done, 120, "the honest agent fully receipted")
    # Replay of a report already in the ledger: not logged again, counted, and its receipt resent.
    ana_logged = [env for kid, _, env in stack.ledger_contributions() if kid == ana_m.key.key_id.hex()]
    dedup_before = stack.metric("midgate_ingest_dedup_hits_total")
    attacker.publish(ana_topic, ana_logged[0], qos=1).wait_for_publish(10)
    wait_until(lambda: stack.metric("midgate_ingest_dedup_hits_total") >= dedup_before + 1, 20, "replay counted")
    wait_until(
        lambda: (
            sum(stack.metric("midgate_ingest_rejected_total", f'reason="{r}"') for r in sent)
            >= sum(len(m) for m in sent.values())
        ),
        30,
        "every bad message counted",
    )
    attacker.loop_stop()
    attacker.disconnect()

    for reason, messages in sent.items():
        assert stack.metric("midgate_ingest_rejected_total", f'reason="{reason}"') == len(messages), reason
    limited = stack.metric("midgate_ingest_rejected_total", 'reason="rate_limited"')
    cai_logged = [kid for kid, _, _ in stack.ledger_contributions() if kid == cai_m.key.key_id.hex()]
    assert limited >= 30 and len(cai_logged) + limited == 40
    contributions = stack.ledger_contributions()
    assert len(contributions) == HONEST_REPORTS + len(cai_logged)
    assert len({(k, s) for k, s, _ in contributions}) == len(contributions)
