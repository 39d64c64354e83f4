"""The broker the way Debian's package runs it, and what enrolment grants tell devices about it.

Debian's mosquitto.service starts Mosquitto as root; it drops to user `mosquitto` before it opens the password file,
the ACL, the TLS key, its persistence, log and pid file, and rereads them, mosquitto.conf included, as that user on
every SIGHUP. A password file it cannot read on a reload empties its logins (everyone refused), so the real-process
test enrols ten devices in a row through `serve` and checks after each SIGHUP that every device and the coordinator
still log in. It needs root and the `mosquitto` user (installed with the package); elsewhere it is skipped.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from mqtt_fixtures import (
    MOSQUITTO,
    MessagingStack,
    MosquittoProcess,
    coordinator_toml,
    free_port,
    wait_for_port,
    wait_until,
)
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError
from typer.testing import CliRunner

from coordinator.broker.config import broker_files
from coordinator.broker.logins import coordinator_password_path, reload_broker, sync_broker_logins
from coordinator.broker.owners import BrokerFilesError, replace_file, rewrite_file
from coordinator.broker.passwords import hash_password
from coordinator.broker.tls import ensure_broker_tls
from coordinator.cli import app as coordinator_app
from coordinator.config import CoordinatorSettings
from coordinator.registry.store import Registry
from coordinator.serve.assembly import device_broker_credentials
from edge.agent.membership import load_membership
from protocol.identity import SignerKey

pytest_plugins = ["mqtt_fixtures"]

MID = "riverside"
ENROLMENTS = 10


def _broker_account() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("Mosquitto drops root to its own user only when started as root")
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no `mosquitto` user: install Debian's mosquitto package")


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A folder the broker's user can enter (pytest's own tmp folders are private to root), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="midgate-broker-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _settings(tmp_path: Path, **broker: object) -> CoordinatorSettings:
    """The coordinator on the plain loopback listener, as docs/messaging.md sets it up; devices on the TLS one."""
    return CoordinatorSettings.load(
        None,
        mid=MID,
        data_dir=tmp_path / "coordinator",
        broker={"host": "127.0.0.1", "port": 1883, **broker},
        broker_config={"output_dir": tmp_path / "broker", "tls_port": 8883, "tls_hostnames": ["mid.example.org"]},
    )


def _stat(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, _group(st.st_gid), st.st_mode & 0o7777


def _group(gid: int) -> str:
    return grp.getgrgid(gid).gr_name


# --- what a grant names ---------------------------------------------------------------------------------------


def test_grant_names_the_tls_listener_and_the_mid_ca_when_the_coordinator_uses_loopback(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    tls = ensure_broker_tls(broker_files(settings).tls_dir, MID, settings.broker_config.tls_hostnames)
    grant = device_broker_credentials(settings)("d-one", "p" * 24)
    assert (grant.host, grant.port, grant.tls) == ("mid.example.org", 8883, True)
    assert grant.ca_pem == tls.ca_cert.read_text() and "BEGIN CERTIFICATE" in grant.ca_pem
    assert (grant.username, grant.password) == ("d-one", "p" * 24)


def test_grant_follows_the_public_settings(tmp_path: Path) -> None:
    ca = tmp_path / "own-ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nown\n-----END CERTIFICATE-----\n")
    settings = _settings(tmp_path, public_host="broker.example.org", public_port=8884, ca_file=str(ca))
    grant = device_broker_credentials(settings)("d-one", "p" * 24)
    assert (grant.host, grant.port, grant.tls, grant.ca_pem) == ("broker.example.org", 8884, True, ca.read_text())

    plain = _settings(tmp_path, public_tls=False, public_port=1883)
    grant = device_broker_credentials(plain)("d-one", "p" * 24)
    assert (grant.port, grant.tls, grant.ca_pem) == (1883, False, "")


def test_plain_grants_must_name_their_port(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="public_port"):
        _settings(tmp_path, public_tls=False)


# --- owners and modes -----------------------------------------------------------------------------------------


def test_broker_config_gives_every_file_the_owner_the_broker_needs(tmp_path: Path) -> None:
    _broker_account()
    config = tmp_path / "coordinator.toml"
    config.write_text(
        coordinator_toml(tmp_path / "coordinator", MID, free_port(), free_port(), plain_devices=False).replace(
            f'output_dir = "{tmp_path / "coordinator" / "broker"}"', f'output_dir = "{tmp_path / "broker"}"'
        )
    )
    result = CliRunner().invoke(coordinator_app, ["broker-config", "--config", str(config)])
    assert result.exit_code == 0, result.output
    # pytest's folders are private to root: broker-config says the broker could not reach its files.
    assert "warning: mosquitto cannot enter /tmp/pytest-of-root" in result.output
    b = tmp_path / "broker"
    root_g, broker = ("root", "mosquitto", 0o640), ("mosquitto", "mosquitto", 0o600)
    expected = {
        b: ("root", "mosquitto", 0o750),
        b / "mosquitto.conf": root_g,  # reread on SIGHUP as the broker's user
        b / "passwords": broker,
        b / "acl": broker,
        b / "tls": ("root", "mosquitto", 0o750),
        b / "tls" / "server.key": broker,
        b / "tls" / "server.crt": ("root", "root", 0o644),
        b / "tls" / "ca.crt": ("root", "root", 0o644),
        b / "tls" / "ca.key": ("root", "root", 0o600),  # the MID CA's key: never the broker's to read
        b / "data": ("mosquitto", "mosquitto", 0o700),
        b / "log": ("mosquitto", "mosquitto", 0o750),
        b / "run": ("mosquitto", "mosquitto", 0o755),
    }
    assert {path: _stat(path) for path in expected} == expected
    conf = (b / "mosquitto.conf").read_text()
    assert "user mosquitto\n" in conf
    assert f"pid_file {b / 'run' / 'mosquitto.pid'}\n" in conf
    assert f"log_dest file {b / 'log' / 'mosquitto.log'}\n" in conf
    dropin = (b / "systemd" / "mosquitto.service.d" / "midgate.conf").read_text()
    assert f"[Service]\nExecStart=\nExecStart=/usr/sbin/mosquitto -c {b / 'mosquitto.conf'}\n" in dropin


def test_rewriting_the_logins_keeps_the_owner_and_mode_the_broker_reads_them_with(tmp_path: Path) -> None:
    account = _broker_account()
    settings = _settings(tmp_path)
    passwords = broker_files(settings).passwords
    passwords.parent.mkdir(parents=True)
    replace_file(passwords, b"", 0o600, (account.pw_uid, account.pw_gid))
    registry = Registry(settings.registry_path)
    try:
        registry.add_invite("i1", "ana", 1, 2**40)
        registry.redeem_invite("i1", 2, "d-one", SignerKey.generate("d-one").verifier, hash_password("p" * 24))
        assert sync_broker_logins(registry, settings) == 2  # the device and the coordinator
    finally:
        registry.close()
    assert _stat(passwords) == ("mosquitto", "mosquitto", 0o600)
    assert sorted(line.split(":")[0] for line in passwords.read_text().splitlines()) == ["coordinator", "d-one"]
    assert [p.name for p in passwords.parent.iterdir()] == ["passwords"]  # no temporary file left behind


def test_logins_that_cannot_keep_their_owner_are_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passwords = tmp_path / "passwords"
    passwords.write_text("d-one:$7$old\n")

    def refused(fd: int, uid: int, gid: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchown", refused)  # what a writer that is neither root nor the owner meets
    with pytest.raises(BrokerFilesError, match="only root may hand a file to another user"):
        rewrite_file(passwords, b"d-two:$7$new\n")
    assert passwords.read_text() == "d-one:$7$old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["passwords"]


def test_reload_signals_only_a_mosquitto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signalled: list[tuple[int, int]] = []
    kill = os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: signalled.append((pid, sig)))  # recorded, not sent
    pid_file = tmp_path / "mosquitto.pid"
    assert not reload_broker(pid_file)  # no pid file: logged, nothing signalled
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(f"{bystander.pid}\n")  # a stale pid file naming a process that is no broker
        assert not reload_broker(pid_file)
        assert signalled == []  # SIGHUP would have ended it
    finally:
        kill(bystander.pid, signal.SIGKILL)
        bystander.wait(timeout=10)
    port = free_port()
    broker = subprocess.Popen([MOSQUITTO, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=broker)  # Popen may return before exec has renamed the child (seen: "python")
        pid_file.write_text(f"{broker.pid}\n")
        assert reload_broker(pid_file)
        assert signalled == [(broker.pid, signal.SIGHUP)]
    finally:
        kill(broker.pid, signal.SIGKILL)
        broker.wait(timeout=10)


# --- the real thing -------------------------------------------------------------------------------------------


def _connack(host: str, port: int, username: str, password: str, ca_file: Path | None) -> int | None:
    """The CONNACK reason code a fresh MQTT 5 login gets (None: no answer in 10 s)."""
    codes: list[int] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{username}-{time.monotonic_ns()}")
    client.username_pw_set(username, password)
    if ca_file is not None:
        client.tls_set(ca_certs=str(ca_file))
    client.on_connect = lambda c, u, f, rc, p: codes.append(rc.value)
    client.connect(host, port)
    client.loop_start()
    try:
        wait_until(lambda: bool(codes), 10, f"CONNACK for {username}")
    except TimeoutError:
        return None
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0]


@pytest.mark.slow
def test_broker_logins_survive_ten_enrolments_in_a_row_as_debian_runs_it(reachable_dir: Path) -> None:
    account = _broker_account()
    stack = MessagingStack(reachable_dir, mid=MID)
    broker_dir = reachable_dir / "broker"
    local_port, tls_port = free_port(), free_port()
    # The coordinator on the plain loopback listener (as documented); devices are granted the TLS listener.
    toml = coordinator_toml(stack.data_dir, MID, local_port, stack.http_port, plain_devices=False)
    stack.config.write_text(
        toml.replace(
            f'[broker_config]\noutput_dir = "{stack.data_dir / "broker"}"\n',
            f'[broker_config]\noutput_dir = "{broker_dir}"\nlisten_host = "127.0.0.1"\n'
            f"tls_port = {tls_port}\nlocal_port = {local_port}\n",
        )
    )
    failed = True
    try:
        result = CliRunner().invoke(coordinator_app, ["broker-config", "--config", str(stack.config)])
        assert result.exit_code == 0 and "cannot enter" not in result.output, result.output
        # Exactly the generated files, started as root: Mosquitto drops to `mosquitto` itself.
        stack.broker = MosquittoProcess(broker_dir, (broker_dir / "mosquitto.conf").read_text(), local_port)
        stack.broker.start()
        pid_file = broker_dir / "run" / "mosquitto.pid"
        wait_until(pid_file.exists, 10, "the pid file Mosquitto writes as its own user")
        assert int(pid_file.read_text()) == stack.broker.pid
        assert Path(f"/proc/{stack.broker.pid}").stat().st_uid == account.pw_uid
        stack.start_coordinator()
        wait_until(lambda: "Sending SUBACK to midgate-coordinator" in stack.broker.log_text(), 30, "coordinator up")
        coordinator = coordinator_password_path(CoordinatorSettings.load(stack.config)).read_text().strip()

        for n in range(1, ENROLMENTS + 1):
            stack.enrol_agent(f"member-{n}")
            wait_until(lambda n=n: stack.broker.log_text().count("Reloading config.") == n, 20, f"reload {n}")
            assert _stat(broker_dir / "passwords") == ("mosquitto", "mosquitto", 0o600)
            for agent in stack.agents:
                membership = load_membership(agent.data_dir / "mids" / MID)
                grant = membership.record.broker
                assert (grant.host, grant.port, grant.tls) == ("localhost", tls_port, True)
                code = _connack(grant.host, grant.port, grant.username, grant.password, membership.ca_file)
                assert code == 0, f"after enrolment {n}, {agent.name} refused ({code})"
            assert _connack("127.0.0.1", local_port, "coordinator", coordinator, None) == 0
        log = stack.broker.log_text()
        assert "Error" not in log and "not authorised" not in log
        assert stack.coordinator is not None and "broker not reloaded" not in stack.coordinator.log_text()
        failed = False
    finally:
        stack.close(failed)
