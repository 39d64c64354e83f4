"""`midgate coordinator broker-config` against a real Mosquitto: TLS with the MID's CA, password logins kept in step
with enrolment and revocation, and ACLs that keep each device to its own topics. Invites over the real endpoint."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
from mqtt_fixtures import (
    DeviceClient,
    MessagingStack,
    MosquittoProcess,
    contribution_report,
    coordinator_toml,
    free_port,
    tls_broker_config_toml,
    wait_until,
    write_bodies,
)
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from edge.agent.membership import load_membership
from protocol.enrolment import sign_invite
from protocol.envelope import decode, open_envelope
from protocol.errors import InviteExpiredError, InviteInvalidError, InviteUsedError
from protocol.identity import SignerKey
from protocol.leaves import LeafKind
from protocol.messages import EnrolmentRequest, KeyRevocation
from protocol.topics import UpKind, up_topic

pytest_plugins = ["mqtt_fixtures"]


def test_broker_config_tls_logins_and_acls(tmp_path: Path) -> None:
    stack = MessagingStack(tmp_path)
    broker_dir = tmp_path / "coordinator" / "broker"
    tls_port, local_port = free_port(), free_port()
    # Coordinator and devices all use the TLS listener, trusting the MID CA that broker-config creates.
    broker_extra = (
        f'pid_file = "{broker_dir / "mosquitto.pid"}"\ntls = true\nca_file = "{broker_dir / "tls" / "ca.crt"}"'
    )
    extra = tls_broker_config_toml(broker_dir, tls_port, local_port)
    toml = coordinator_toml(
        stack.data_dir, stack.mid, tls_port, stack.http_port, broker_extra=broker_extra, plain_devices=False
    )
    stack.config.write_text(toml.replace(f'[broker_config]\noutput_dir = "{broker_dir}"\n', "") + extra)
    failed = True
    try:
        result = CliRunner().invoke(coordinator_app, ["broker-config", "--config", str(stack.config)])
        assert result.exit_code == 0, result.output
        conf = (broker_dir / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and f"listener {tls_port} 127.0.0.1" in conf
        assert "max_queued_messages 200000" in conf
        acl = (broker_dir / "acl").read_text()
        assert "pattern write mid/riverside/dev/%u/up/#" in acl
        assert (broker_dir / "passwords").stat().st_mode & 0o077 == 0

        assert f"pid_file {broker_dir / 'mosquitto.pid'}" in conf
        stack.broker = MosquittoProcess(broker_dir, conf, local_port)
        stack.broker.start()
        wait_until(lambda: (broker_dir / "mosquitto.pid").exists(), 10, "mosquitto pid file")
        stack.start_coordinator()
        ana, ben = stack.enrol_agent("ana"), stack.enrol_agent("ben")
        ana_m = load_membership(ana.data_dir / "mids" / stack.mid)
        ben_m = load_membership(ben.data_dir / "mids" / stack.mid)
        ca = ana_m.directory / "ca.pem"
        # The grant names the TLS listener by a name in its certificate, as the agent must verify it.
        grant = ana_m.record.broker
        assert (grant.host, grant.port, grant.tls) == ("localhost", tls_port, True)
        assert ca.read_text() == (broker_dir / "tls" / "ca.crt").read_text()  # handed out at enrolment

        # The coordinator logs in with its own password; wait for its subscription before publishing.
        wait_until(lambda: "Sending SUBACK to midgate-coordinator" in stack.broker.log_text(), 20, "coordinator up")
        probe = DeviceClient(tls_port, ana_m.device, ana_m.record.broker.password, ca)
        assert probe.connack == [0]
        report = contribution_report(1, ana_m.device, 1, int(time.time() * 1000)).seal(ana_m.key)
        assert probe.publish(up_topic(stack.mid, ana_m.device, UpKind.REPORT), report) == 0
        forged_topic = up_topic(stack.mid, ben_m.device, UpKind.REPORT)
        assert probe.publish(forged_topic, report) == 135  # MQTT 5 "Not authorized"
        # Mosquitto grants the SUBACK but never delivers another device's messages (read ACL per message).
        probe.client.subscribe(f"mid/{stack.mid}/dev/{ben_m.device}/down/+", qos=1)
        wait_until(lambda: len(probe.subacks) == 1, 10, "SUBACK")
        ben_probe = DeviceClient(tls_port, ben_m.device, ben_m.record.broker.password, ca)
        ben_probe.client.subscribe(f"mid/{stack.mid}/dev/{ben_m.device}/down/+", qos=1)
        wait_until(lambda: len(ben_probe.subacks) == 1, 10, "SUBACK")
        ben_report = contribution_report(2, ben_m.device, 1, int(time.time() * 1000)).seal(ben_m.key)
        assert ben_probe.publish(up_topic(stack.mid, ben_m.device, UpKind.REPORT), ben_report) == 0
        wait_until(lambda: len(ben_probe.received) == 1, 20, "ben's receipt")
        assert probe.received == []
        probe.close()
        ben_probe.close()
        wait_until(lambda: stack.metric("midgate_ingest_accepted_total") == 2, 20, "the allowed reports accepted")
        assert stack.metric("midgate_ingest_received_total") == 2
        assert stack.metric("midgate_ingest_rejected_total", 'reason="topic_mismatch"') == 0

        wrong = DeviceClient(tls_port, ana_m.device, "x" * 32, ca)
        assert wrong.connack in ([134], [135])  # bad user name or password / not authorized
        wrong.close()

        # The agent daemon itself over TLS with its enrolment credentials, within the ACL.
        stack.start_invited_agent(ana)  # the invitation over TLS with the coordinator's login, as `job start` sends it
        write_bodies([ana], 20, first=100)
        wait_until(lambda: ana.outbox_counts() == (0, 20), 60, "20 receipts over TLS")
        assert "Denied" not in stack.broker.log_text().split("as " + ana.device)[-1]

        result = CliRunner().invoke(coordinator_app, ["revoke", ben_m.device, "--config", str(stack.config)])
        assert result.exit_code == 0, result.output
        wait_until(lambda: ben_m.device not in (broker_dir / "passwords").read_text(), 5, "login removed")

        def ben_refused() -> bool:
            client = DeviceClient(tls_port, ben_m.device, ben_m.record.broker.password, ca)
            client.close()
            return client.connack == [134] or client.connack == [135]

        wait_until(ben_refused, 10, "revoked device refused by the broker")
        # The running coordinator logs the revocation as a MID-signed key-revoke leaf, once.
        wait_until(lambda: len(stack.ledger_leaves(LeafKind.KEY_REVOKE)) == 1, 10, "revocation logged")
        (signed,) = stack.ledger_leaves(LeafKind.KEY_REVOKE)
        mid_key = ana_m.mid_key
        revocation = decode(
            open_envelope(signed, {mid_key.key_id.hex(): mid_key}, KeyRevocation.PAYLOAD_TYPE), KeyRevocation
        )
        assert (revocation.device, revocation.device_key) == (ben_m.device, ben_m.key.verifier.text())
        failed = False
    finally:
        stack.close(failed)


def _post(port: int, body: bytes) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/enrol", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _request(token: str, mid: str = "riverside") -> bytes:
    key = SignerKey.generate("d-probe")
    return EnrolmentRequest(
        mid=mid,
        device="d-probe",
        device_key=key.verifier.text(),
        invite_token=token,
        seq=0,
        device_time_ms=int(time.time() * 1000),
    ).seal(key)


@pytest.mark.slow
def test_invites_expired_reused_and_forged_are_refused(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    stack.start_broker()
    stack.start_coordinator()
    url = f"http://127.0.0.1:{stack.http_port}"
    ana = stack.enrol_agent("ana")
    assert ana.device

    token = stack.invite("ben")
    settings = AgentSettings.load(None, data_dir=stack.root / "ben")
    enrol(settings, url, token)
    with pytest.raises(InviteUsedError):
        enrol(AgentSettings.load(None, data_dir=stack.root / "ben2"), url, token)
    status, body = _post(stack.http_port, _request(token))
    assert (status, body["reason"]) == (409, "invite_used")

    expired = stack.invite("cai", ttl_s=0)
    with pytest.raises(InviteExpiredError):
        enrol(AgentSettings.load(None, data_dir=stack.root / "cai"), url, expired)
    status, body = _post(stack.http_port, _request(expired))
    assert (status, body["reason"]) == (410, "invite_expired")

    _, forged = sign_invite(SignerKey.generate("midgate/riverside"), "riverside", int(time.time() * 1000) + 60_000)
    with pytest.raises(InviteInvalidError):
        enrol(AgentSettings.load(None, data_dir=stack.root / "dan"), url, forged)
    status, body = _post(stack.http_port, _request(forged))
    assert (status, body["reason"]) == (403, "invite_invalid")
    status, body = _post(stack.http_port, _request(stack.invite("eve"), mid="elsewhere"))
    assert (status, body["reason"]) == (403, "invite_invalid")
    status, body = _post(stack.http_port, b"{" * 100)
    assert (status, body["reason"]) == (400, "malformed")

    assert stack.metric("midgate_ingest_rejected_total", 'reason="invite_used"') == 2  # agent + raw POST
    assert stack.metric("midgate_ingest_rejected_total", 'reason="invite_expired"') == 1
    assert stack.metric("midgate_ingest_rejected_total", 'reason="invite_invalid"') == 2
    from coordinator.registry.store import Registry

    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        assert len(registry.devices()) == 2  # ana and ben; every refusal left nothing behind
    finally:
        registry.close()
    assert stack.ledger_size() == 2 + 1  # their enrolments, and the POLICY leaf serve logs when it starts
