"""A member's device that reaches its MID only through the member's Pi hub, on real processes: the MID's Mosquitto as
`coordinator broker-config` writes it (TLS, logins, ACL), `coordinator serve`, a relay login made with `coordinator
relay add`, the hub's Mosquitto as `install.sh --hub --hub-device ... --bridge ...` writes it (hub-mosquitto.sh), and
`agent run` with a `[[via_hub]]` table. The device's reports cross the hub's bridge and their receipts come back;
the relay may carry its own member's devices only, and a revoked relay is refused."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest
from mqtt_fixtures import (
    DeviceClient,
    MessagingStack,
    MosquittoProcess,
    contribution_report,
    coordinator_toml,
    free_port,
    running_mosquitto,
    tls_broker_config_toml,
    wait_until,
    write_bodies,
)
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from edge.agent.cli import app as agent_app
from edge.agent.daemon_status import read_daemon_status
from edge.agent.membership import load_membership
from protocol.topics import UpKind, up_topic

pytest_plugins = ["mqtt_fixtures"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HUB_SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "raspberrypi" / "hub-mosquitto.sh"


def coordinator(*args: str) -> str:
    result = CliRunner().invoke(coordinator_app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_a_device_at_home_reports_through_the_hub_s_bridge_with_the_member_s_relay_login(tmp_path: Path) -> None:
    stack = MessagingStack(tmp_path)
    broker_dir = tmp_path / "coordinator" / "broker"
    tls_port, local_port, hub_port = free_port(), free_port(), free_port()
    broker_extra = f'pid_file = "{broker_dir / "mosquitto.pid"}"'
    # Devices are granted the TLS listener, the coordinator itself uses the plain loopback one.
    toml = coordinator_toml(
        stack.data_dir, stack.mid, local_port, stack.http_port, broker_extra=broker_extra, plain_devices=False
    )
    stack.config.write_text(
        toml.replace(f'[broker_config]\noutput_dir = "{broker_dir}"\n', "")
        + tls_broker_config_toml(broker_dir, tls_port, local_port)
    )
    config = ["--config", str(stack.config)]
    failed = True
    processes = contextlib.ExitStack()
    try:
        coordinator("broker-config", *config)
        stack.broker = MosquittoProcess(broker_dir, (broker_dir / "mosquitto.conf").read_text(), local_port)
        stack.broker.start()
        wait_until(lambda: (broker_dir / "mosquitto.pid").exists(), 10, "mosquitto pid file")
        stack.start_coordinator()
        ben = stack.enrol_agent("ben")

        # The operator makes ann's hub a relay login before ann's device is enrolled: the device is added to what
        # the relay may carry when it enrols (serve rewrites the ACL and reloads the broker).
        stack.invite("ann")
        relay_password = tmp_path / "relay.password"
        added = coordinator("relay", "add", "home", "--member", "ann", "--password-file", str(relay_password), *config)
        assert "login relay.home, password in" in added and "carries 0 device(s) of ann" in added
        assert relay_password.stat().st_mode & 0o077 == 0
        assert "user relay.home" in (broker_dir / "acl").read_text()
        ann = stack.enrol_agent("ann")
        acl = (broker_dir / "acl").read_text()
        assert f"topic write mid/{stack.mid}/dev/{ann.device}/up/#" in acl
        assert f"dev/{ben.device}/" not in acl  # ben's devices: only the pattern every device has for itself
        listed = coordinator("relay", "list", *config).splitlines()
        assert listed[1].split("\t") == ["home", "relay.home", "ann", "active", ann.device]

        # The hub's Mosquitto, as install.sh --hub --hub-device ANN --bridge ... writes it.
        ca = broker_dir / "tls" / "ca.crt"
        conf, secrets = tmp_path / "hub" / "conf.d", tmp_path / "hub" / "secrets"
        hub_args = ["--conf-dir", str(conf), "--secret-dir", str(secrets), "--port", str(hub_port), "--device"]
        bridge_args = ["--bridge", f"127.0.0.1:{tls_port}", "--bridge-login", "relay.home", "--bridge-password-file"]
        generated = subprocess.run(
            ["bash", str(HUB_SCRIPT), *hub_args, ann.device, *bridge_args, str(relay_password), "--bridge-ca", str(ca)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert generated.returncode == 0, generated.stdout + generated.stderr
        hub_password = secrets / f"{ann.device}.secret"
        hub_broker = processes.enter_context(
            running_mosquitto(tmp_path / "hub" / "broker", f"include_dir {conf}\nlog_type all\n", hub_port)
        )
        wait_until(lambda: "u'relay.home'" in stack.broker.log_text(), 30, "the hub's bridge logged in over TLS")

        # ann's agent names the hub for this MID; it never logs in to the MID's broker itself.
        with ann.config.open("a") as agent_config:
            agent_config.write(
                f'\n[[via_hub]]\nmid = "{stack.mid}"\nhost = "127.0.0.1"\nport = {hub_port}\n'
                f'password_file = "{hub_password}"\n'
            )
        stack.start_agent(ann)
        wait_until(lambda: f"SUBSCRIBE from {ann.device}" in hub_broker.log_text(), 30, "ann's agent on the hub")
        stack.invite_to_run(ann)
        write_bodies([ann], 5, first=300)
        wait_until(lambda: ann.outbox_counts() == (0, 5), 60, "5 receipts back through the hub")
        assert f"u'{ann.device}'" not in stack.broker.log_text()
        ann_m, ben_m = (load_membership(h.data_dir / "mids" / stack.mid) for h in (ann, ben))

        def connected() -> bool:
            status = read_daemon_status(ann_m.directory)
            return status is not None and status.connected

        wait_until(connected, 30, "ann's agent says it is connected")
        assert read_daemon_status(ann_m.directory).broker == f"127.0.0.1:{hub_port} (through a hub)"  # type: ignore[union-attr]
        status = CliRunner().invoke(agent_app, ["status", "--config", str(ann.config)])
        assert status.exit_code == 0 and f"connected to 127.0.0.1:{hub_port} (through a" in status.output, status.output

        # The relay's login at the MID: ann's devices' topics only (the ACL), whatever the hub's bridge is told.
        probe = DeviceClient(tls_port, "relay.home", relay_password.read_text().strip(), ca)
        now = int(time.time() * 1000)
        ben_report = contribution_report(1, ben_m.device, 1, now).seal(ben_m.key)
        assert probe.publish(up_topic(stack.mid, ben.device, UpKind.REPORT), ben_report) == 135  # not authorised
        ann_report = contribution_report(2, ann_m.device, 900, now).seal(ann_m.key)
        assert probe.publish(up_topic(stack.mid, ann.device, UpKind.REPORT), ann_report) == 0
        probe.close()
        # On the hub, ann's login writes only ann's topics: nothing for ben crosses the bridge from there.
        hub_probe = DeviceClient(hub_port, ann.device, hub_password.read_text().strip(), None)
        assert hub_probe.publish(up_topic(stack.mid, ben.device, UpKind.REPORT), ben_report) == 135
        hub_probe.close()

        coordinator("relay", "revoke", "home", *config)
        assert "relay.home" not in (broker_dir / "passwords").read_text()
        assert "user relay.home" not in (broker_dir / "acl").read_text()

        def relay_refused() -> bool:
            client = DeviceClient(tls_port, "relay.home", relay_password.read_text().strip(), ca)
            client.close()
            return client.connack in ([134], [135])

        wait_until(relay_refused, 10, "the revoked relay refused by the broker")
        again = CliRunner().invoke(coordinator_app, ["relay", "add", "home", "--member", "ann", *config])
        assert again.exit_code == 1 and "names are not reused" in again.output
        failed = False
    finally:
        processes.close()
        stack.close(failed)
