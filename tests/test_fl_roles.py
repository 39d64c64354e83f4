"""The Flower Deployment Engine inside midgate's roles: `midgate coordinator serve` with `[federation] enabled`
runs the MID's SuperLink (TLS from the MID CA, SuperNode authentication, no runtime dependency installation,
telemetry off, FLWR_HOME under data_dir) and stops it with itself; enrolment registers each device's Flower key with
it and stores node id <-> device <-> member."""

from __future__ import annotations

import base64
import contextlib
import json
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import pytest
from agent_sensing import plaid_sensor_toml, wait_loaded
from mqtt_fixtures import (
    MosquittoProcess,
    ServiceProcess,
    agent_toml,
    coordinator_toml,
    free_port,
    http_ready,
    signed_invitation,
    wait_until,
)

from coordinator.config import CoordinatorSettings
from coordinator.federation.flower_cli import CONNECTION, FlowerCli, FlowerCliError
from coordinator.federation.superlink_process import kill_pids
from coordinator.mid_key import load_or_create_mid_key, mid_key_name
from coordinator.registry.store import Registry
from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from edge.agent.membership import MembershipRecord
from edge.federated.supernode import generate_node_key
from edge.sensors.plaid import load_plaid
from protocol.errors import Reason
from protocol.identity import SignerKey
from protocol.messages import EnrolmentRequest
from protocol.tasks.spec import get_task
from protocol.tasks.windows import load_window_file
from protocol.topics import DownKind, down_topic

pytest_plugins = ["mqtt_fixtures"]

MID = "riverside"


def _children_running(pid: int, command: str) -> list[psutil.Process]:
    """The processes below `pid` whose command line contains `command`."""
    with contextlib.suppress(psutil.Error):
        return [p for p in psutil.Process(pid).children(recursive=True) if command in " ".join(p.cmdline())]
    return []


def _superlinks(pid: int) -> list[psutil.Process]:
    return _children_running(pid, "flower-superlink")


@pytest.fixture
def serve_with_superlink(tmp_path: Path, mosquitto: MosquittoProcess) -> Iterator[tuple[ServiceProcess, Path, int]]:
    data_dir = tmp_path / "coordinator"
    link_port, http_port = free_port(), free_port()
    config = tmp_path / "coordinator.toml"
    config.write_text(
        coordinator_toml(data_dir, MID, mosquitto.port, http_port)
        + f"[federation]\nenabled = true\nport = {link_port}\n"
    )
    serve = ServiceProcess("serve", ["coordinator", "serve", "--config", str(config)], tmp_path / "serve.log")
    serve.start()
    assert serve.proc is not None
    below: list[int] = []
    try:
        wait_until(lambda: http_ready(http_port) or not serve.alive, 90, "serve's HTTP endpoint")
        assert serve.alive, serve.log_text()
        below = [p.pid for p in psutil.Process(serve.proc.pid).children(recursive=True)]
        yield serve, data_dir, link_port
    except BaseException:
        print(f"---- serve log ----\n{serve.log_text()[-8000:]}")
        for log in data_dir.glob("federation/**/*.log"):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-8000:]}")
        raise
    finally:
        serve.stop()
        kill_pids(below, 5.0)  # only matters if serve died without stopping its SuperLink


def _fronts(pid: int) -> list[psutil.Process]:
    return _children_running(pid, "fleet_front")


def _superlink_address(data_dir: Path) -> str:
    """The SuperLink's own API, behind the fleet front: `serve` writes it for `job start`."""
    return (data_dir / "federation" / "superlink-address").read_text().strip()


@pytest.mark.slow
def test_serve_runs_the_superlink_with_mid_ca_and_auth_and_stops_it(
    serve_with_superlink: tuple[ServiceProcess, Path, int], tmp_path: Path
) -> None:
    serve, data_dir, link_port = serve_with_superlink
    assert serve.proc is not None
    links = _superlinks(serve.proc.pid)
    assert len(links) == 1
    argv = links[0].cmdline()
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-ca-certfile"):
        assert flag in argv
    env = links[0].environ()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert Path(env["FLWR_HOME"]).is_relative_to(data_dir)
    # The SuperLink's certificate chains to the MID CA that `broker-config --tls` uses and devices receive.
    ca_cert = data_dir / "broker" / "tls" / "ca.crt"
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(ca_cert)
    # The SuperLink listens on loopback only; devices' port is the fleet front's.
    internal = _superlink_address(data_dir)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert internal == f"127.0.0.1:{argv[argv.index('--port') + 1]}" and internal != f"127.0.0.1:{link_port}"
    fronts = _fronts(serve.proc.pid)
    assert len(fronts) == 1

    # A client that trusts only the MID CA reaches it over TLS and can register a SuperNode key (auth is on).
    cli = FlowerCli(tmp_path / "flwr-cli", internal, ca_cert)
    cli.write_config()
    first = cli.register_node(generate_node_key(tmp_path / "k1").public_key)
    second = cli.register_node(generate_node_key(tmp_path / "k2").public_key)
    assert first != second and first > 0 and second > 0
    # Through the devices' port the same Control API is not there.
    public = FlowerCli(tmp_path / "flwr-public", f"127.0.0.1:{link_port}", ca_cert)
    public.write_config()
    with pytest.raises(FlowerCliError):
        public.register_node(generate_node_key(tmp_path / "k3").public_key)

    link_pids = [p.pid for p in links + fronts] + [c.pid for p in links for c in p.children(recursive=True)]
    serve.stop()
    assert serve.proc.returncode == 0, serve.log_text()
    assert not [pid for pid in link_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not (data_dir / "federation" / "superlink-address").exists()


def _invite(data_dir: Path, member: str) -> str:
    from coordinator.enrolment.enroller import issue_invite
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.registry.store import Registry

    key = load_or_create_mid_key(data_dir / "mid.key", MID)
    registry = Registry(data_dir / "registry.sqlite")
    try:
        return issue_invite(registry, key, MID, member, time.time_ns() // 1_000_000, 3600)
    finally:
        registry.close()


def _enrol(tmp_path: Path, name: str, http_port: int, token: str) -> tuple[AgentSettings, MembershipRecord]:
    settings_file = tmp_path / f"agent-{name}.toml"
    settings_file.write_text(agent_toml(tmp_path / f"agent-{name}"))
    settings = AgentSettings.load(settings_file)
    return settings, enrol(settings, f"http://127.0.0.1:{http_port}", token)


def _http_port(data_dir: Path) -> int:
    return CoordinatorSettings.load(data_dir.parent / "coordinator.toml").enrolment.port


@pytest.mark.slow
def test_enrolment_registers_the_flower_key_and_stores_node_device_member(
    serve_with_superlink: tuple[ServiceProcess, Path, int], tmp_path: Path
) -> None:
    _, data_dir, link_port = serve_with_superlink
    http_port = _http_port(data_dir)
    enrolled = {name: _enrol(tmp_path, name, http_port, _invite(data_dir, name)) for name in ("ann", "bob")}
    node_ids = {name: record.flower_node_id for name, (_, record) in enrolled.items()}
    assert all(node_ids.values()) and len(set(node_ids.values())) == 2

    registry = Registry(data_dir / "registry.sqlite")
    try:
        for name, (settings, record) in enrolled.items():
            assert record.superlink == f"127.0.0.1:{link_port}"
            assert "BEGIN CERTIFICATE" in record.superlink_ca_pem
            membership = settings.membership_dir(MID)
            private = membership / "flower" / "supernode"
            assert stat.S_IMODE(private.stat().st_mode) == 0o600
            node = registry.flower_node_by_id(record.flower_node_id)
            assert node is not None
            assert (node.device_id, node.member_id) == (record.device, name)
            assert node.public_key == (membership / "flower" / "supernode.pub").read_text().strip()
            assert (membership / "superlink-ca.pem").read_text() == record.superlink_ca_pem
    finally:
        registry.close()

    # The SuperLink itself knows both keys under those node ids.
    cli = FlowerCli(tmp_path / "flwr-cli", _superlink_address(data_dir), data_dir / "broker" / "tls" / "ca.crt")
    cli.write_config()
    listed = cli._run("supernode", "list", CONNECTION, "--format", "json")
    for node_id in node_ids.values():
        assert str(node_id) in listed


@pytest.mark.slow
def test_enrolment_with_a_bad_flower_key_is_refused_and_leaves_the_invite_unused(
    serve_with_superlink: tuple[ServiceProcess, Path, int], tmp_path: Path
) -> None:
    _, data_dir, _ = serve_with_superlink
    http_port = _http_port(data_dir)
    token = _invite(data_dir, "cat")
    key = SignerKey.generate("d-0123456789abcdef")
    # Right prefix and length, but not a P-256 point: refused before the invite is used.
    bogus = "ecdsa-sha2-nistp256 " + base64.b64encode(b"\x00" * 104).decode()
    request = EnrolmentRequest(
        mid=MID,
        device=key.name,
        device_key=key.verifier.text(),
        invite_token=token,
        seq=0,
        device_time_ms=time.time_ns() // 1_000_000,
        flower_key=bogus,
    ).seal(key)
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/enrol", data=request, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=30)
    assert json.loads(refused.value.read())["reason"] == Reason.BAD_KEY

    registry = Registry(data_dir / "registry.sqlite")
    try:
        assert registry.device(key.name) is None
    finally:
        registry.close()
    _, record = _enrol(tmp_path, "cat", http_port, token)
    assert record.member == "cat" and record.flower_node_id != 0


def _supernodes(pid: int) -> list[psutil.Process]:
    """The SuperNodes below `pid` (Flower's `flower-supernode`, or the launcher of a warm executor's
    `midgate-supernode`): not the warm executor, whose command line names the programs it forks
    (`--entry midgate-supernode=...`), nor what it forked (a fork keeps its parent's command line)."""
    with contextlib.suppress(psutil.Error):
        return [
            p
            for p in psutil.Process(pid).children(recursive=True)
            if "-supernode" in (cmdline := " ".join(p.cmdline())) and WARM_EXECUTOR not in cmdline
        ]
    return []


WARM_EXECUTOR = "edge.federated.acceleration.warm_executor"


@pytest.mark.slow
def test_agent_runs_its_supernode_only_while_invited_to_a_job(
    serve_with_superlink: tuple[ServiceProcess, Path, int], mosquitto: MosquittoProcess, tmp_path: Path
) -> None:
    _, data_dir, link_port = serve_with_superlink
    settings, record = _enrol(tmp_path, "ann", _http_port(data_dir), _invite(data_dir, "ann"))
    config = tmp_path / "agent-ann.toml"
    config.write_text(agent_toml(tmp_path / "agent-ann", plaid_sensor_toml("0:40")))  # the member's recordings
    agent = ServiceProcess("agent", ["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    agent.start()
    assert agent.proc is not None
    below: list[int] = []
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-coordinator")
    try:
        publisher.connect("127.0.0.1", mosquitto.port)
        publisher.loop_start()
        subscribed = f"Received PUBLISH from {record.device}"  # its first heartbeat: connected and subscribed
        wait_until(lambda: subscribed in mosquitto.log_text() or not agent.alive, 60, "agent subscribed")
        assert agent.alive
        wait_loaded(tmp_path / "agent-ann" / "samples.db")
        assert _supernodes(agent.proc.pid) == []  # between jobs: no Flower process
        topic = down_topic(MID, record.device, DownKind.INVITE)
        mid_key = load_or_create_mid_key(data_dir / "mid.key", MID)

        # A job whose task needs inputs this member's store lacks is declined, with the reason; nothing starts.
        without_inputs = signed_invitation(mid_key, "job-env", 3, task_id="env-forecast")
        publisher.publish(topic, without_inputs, qos=1).wait_for_publish(10)
        wait_until(lambda: "invitation declined: job job-env" in agent.log_text(), 30, "job without inputs declined")
        assert "no_fitting_data" in agent.log_text() and "lack ['temperature_c'" in agent.log_text()
        assert _supernodes(agent.proc.pid) == []

        # An invitation not signed by the MID key starts nothing.
        forged = signed_invitation(SignerKey.generate(mid_key_name(MID)), "job-x", 1)
        publisher.publish(topic, forged, qos=1).wait_for_publish(10)
        wait_until(lambda: "invitation refused" in agent.log_text(), 30, "forged invitation refused")
        assert _supernodes(agent.proc.pid) == []

        publisher.publish(topic, signed_invitation(mid_key, "job-1", 7, deadline_s=25), qos=1).wait_for_publish(10)
        wait_until(lambda: bool(_supernodes(agent.proc.pid)), 60, "SuperNode started for the job")  # type: ignore[union-attr]
        node = _supernodes(agent.proc.pid)[0]
        argv = node.cmdline()
        below = [node.pid] + [c.pid for c in node.children(recursive=True)]
        assert argv[argv.index("--superlink") + 1] == f"127.0.0.1:{link_port}"
        membership = settings.membership_dir(MID)
        assert argv[argv.index("--auth-supernode-private-key") + 1] == str(membership / "flower" / "supernode")
        assert argv[argv.index("--root-certificates") + 1] == str(membership / "superlink-ca.pem")
        # The windows were cut from the store for this job: segment mode, one window per recording, PLAID's labels.
        windows = membership / "jobs" / "job-1" / "windows.npz"
        assert f"data-path='{windows}'" in argv[argv.index("--node-config") + 1]
        cut = load_window_file(windows, get_task("plaid-appliance", 1))
        assert cut.x.shape == (40, 1, 128) and cut.fingerprint.startswith("merkle-sha256:")
        plaid = load_plaid("train")
        np.testing.assert_array_equal(cut.y, plaid.y[:40])
        np.testing.assert_allclose(cut.x[:, 0, :], plaid.X[:40], rtol=1e-6)

        # The job's deadline passes with no further invitation: the node and everything below it are gone.
        below += [c.pid for c in node.children(recursive=True) if c.pid not in below]
        wait_until(lambda: "supernode stopped" in agent.log_text(), 90, "SuperNode stopped after the job")
        assert _supernodes(agent.proc.pid) == []
        assert not [pid for pid in below if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert agent.alive
    except BaseException:
        print(f"---- agent log ----\n{agent.log_text()[-8000:]}")
        for log in (tmp_path / "agent-ann").glob("**/supernode.log"):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        if agent.proc is not None:
            below += [p.pid for p in _supernodes(agent.proc.pid)]
        agent.stop()
        kill_pids(below, 5.0)
