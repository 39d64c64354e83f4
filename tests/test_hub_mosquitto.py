"""The hub's Mosquitto configuration as `install.sh --hub` writes it (deploy/raspberrypi/hub-mosquitto.sh), run by a
real Mosquitto included the way Debian's mosquitto.conf includes conf.d: logins are required, each small sensor
publishes only under its own topic, only the agent reads them, and a re-run keeps every password."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiomqtt
import pytest
from mqtt_fixtures import DeviceClient, free_port, running_mosquitto, wait_until

from coordinator.broker.tls import ensure_broker_tls

pytestmark = pytest.mark.timeout(120)

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "raspberrypi" / "hub-mosquitto.sh"


def run_script(conf: Path, secrets: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), "--conf-dir", str(conf), "--secret-dir", str(secrets), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def generate(conf: Path, secrets: Path, *args: str) -> None:
    done = run_script(conf, secrets, *args)
    assert done.returncode == 0, done.stdout + done.stderr


def secret(secrets: Path, login: str) -> str:
    return (secrets / f"{login}.secret").read_text().strip()


async def exchange(port: int, secrets: Path) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The agent and the kitchen sensor subscribe to sensors/#; the kitchen publishes on its own topic, on another
    sensor's and on a topic the bridge would forward, the hall sensor on its own, and the kitchen a closing marker.
    What the agent and the kitchen receive, up to that marker."""

    def login(name: str, file: str) -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", port, username=name, password=secret(secrets, file), identifier=name)

    agent, kitchen, hall = login("midgate-agent", "agent"), login("kitchen", "kitchen"), login("hall", "hall")
    async with agent, kitchen, hall:
        await agent.subscribe("sensors/#", qos=1)
        await agent.subscribe("mid/#", qos=1)  # denied by the ACL: nothing arrives from it
        await kitchen.subscribe("sensors/#", qos=1)  # allowed for its own topics only
        for topic, payload in [
            ("sensors/kitchen/state", b'{"temperature": 21.5}'),
            ("sensors/hall/state", b'{"temperature": 99}'),  # passing for another sensor
            ("mid/riverside/dev/d-1/up/report", b"forged"),  # into what the bridge forwards
        ]:
            await kitchen.publish(topic, payload, qos=1)
        await hall.publish("sensors/hall/state", b'{"temperature": 18}', qos=1)  # acknowledged: routed before `end`
        await kitchen.publish("sensors/kitchen/state", b"end", qos=1)
        return await _until_end(agent), await _until_end(kitchen)


async def _until_end(client: aiomqtt.Client) -> list[tuple[str, bytes]]:
    received: list[tuple[str, bytes]] = []
    async with asyncio.timeout(20):
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            received.append((message.topic.value, message.payload))
            if message.payload == b"end":
                return received
    raise AssertionError("the message iteration ended")


async def refused(port: int, username: str | None, password: str | None) -> bool:
    try:
        async with aiomqtt.Client("127.0.0.1", port, username=username, password=password):
            return False
    except aiomqtt.MqttCodeError:
        return True


def test_the_generated_config_runs_and_holds_each_login_to_its_topics(tmp_path: Path) -> None:
    conf, secrets, port = tmp_path / "conf.d", tmp_path / "secrets", free_port()
    generate(conf, secrets, "--port", str(port), "--sensor", "kitchen", "--sensor", "hall")
    assert f"listener {port} 127.0.0.1\n" in (conf / "midgate-hub.conf").read_text()  # loopback unless --lan
    assert oct((secrets / "kitchen.secret").stat().st_mode & 0o777) == "0o600"
    with running_mosquitto(tmp_path / "broker", f"include_dir {conf}\n", port) as broker:
        to_agent, to_kitchen = asyncio.run(exchange(port, secrets))
        kitchen_own = [("sensors/kitchen/state", b'{"temperature": 21.5}'), ("sensors/kitchen/state", b"end")]
        assert to_agent == [kitchen_own[0], ("sensors/hall/state", b'{"temperature": 18}'), kitchen_own[1]]
        assert to_kitchen == kitchen_own  # not the hall's readings
        assert asyncio.run(refused(port, None, None)), broker.log_text()  # anonymous
        assert asyncio.run(refused(port, "kitchen", "not-its-password")), broker.log_text()


def test_a_re_run_keeps_every_password_and_the_listener_and_adds_new_sensors(tmp_path: Path) -> None:
    conf, secrets = tmp_path / "conf.d", tmp_path / "secrets"
    generate(conf, secrets, "--sensor", "kitchen")
    before = {login: secret(secrets, login) for login in ("agent", "kitchen")}
    hashes = (conf / "midgate-hub.passwd").read_text()
    generate(conf, secrets, "--sensor", "kitchen", "--sensor", "hall", "--lan")
    assert {login: secret(secrets, login) for login in ("agent", "kitchen")} == before
    assert (conf / "midgate-hub.passwd").read_text().startswith(hashes) and "\nhall:" in (
        conf / "midgate-hub.passwd"
    ).read_text()
    assert "listener 1883 0.0.0.0\n" in (conf / "midgate-hub.conf").read_text()
    generate(conf, secrets, "--sensor", "kitchen")  # a re-run without --lan keeps the listener open
    assert "listener 1883 0.0.0.0\n" in (conf / "midgate-hub.conf").read_text()
    generate(conf, secrets, "--loopback")
    assert "listener 1883 127.0.0.1\n" in (conf / "midgate-hub.conf").read_text()


def test_a_device_login_writes_only_its_own_mid_topics_and_names_never_clash(tmp_path: Path) -> None:
    """Another midgate device at home (--device, its device id) publishes on its own up topics only, which the bridge
    carries; a sensor cannot write them, nor it a sensor's. A re-run adds devices and keeps the others' logins."""
    conf, secrets, port = tmp_path / "conf.d", tmp_path / "secrets", free_port()
    generate(conf, secrets, "--port", str(port), "--sensor", "kitchen", "--device", "d-1")
    first = secret(secrets, "d-1")
    generate(conf, secrets, "--port", str(port), "--device", "d-2", "--device", "d-1")
    assert secret(secrets, "d-1") == first and (conf / "midgate-hub.devices").read_text() == "d-1\nd-2\n"
    assert oct((secrets / "d-2.secret").stat().st_mode & 0o777) == "0o600"
    for clash in (["--sensor", "d-1"], ["--device", "kitchen"]):
        done = run_script(conf, secrets, *clash)
        assert done.returncode != 0 and "login" in done.stderr, done.stderr
    with running_mosquitto(tmp_path / "broker", f"include_dir {conf}\n", port) as broker:
        d1 = DeviceClient(port, "d-1", first, None)
        kitchen = DeviceClient(port, "kitchen", secret(secrets, "kitchen"), None)
        try:
            # Accepted: 16, "no matching subscribers" (no bridge here); refused: 135, "not authorized".
            assert d1.publish("mid/riverside/dev/d-1/up/report", b"signed") == 16, broker.log_text()
            assert d1.publish("mid/riverside/dev/d-2/up/report", b"passing for d-2") == 135  # not authorised
            assert d1.publish("mid/riverside/dev/d-1/down/receipt", b"a receipt of its own") == 135
            assert d1.publish("sensors/kitchen/state", b'{"temperature": 99}') == 135
            assert kitchen.publish("mid/riverside/dev/d-1/up/report", b"forged") == 135
        finally:
            d1.close()
            kitchen.close()


@pytest.mark.parametrize(
    "bad",
    [
        ["--sensor", "Kitchen"],
        ["--sensor", "midgate-agent"],
        ["--sensor", "agent"],
        ["--device", "D-1"],
        ["--device", "-d"],
        ["--device", "agent"],
        ["--port", "0"],
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, bad: list[str]) -> None:
    done = run_script(tmp_path / "c", tmp_path / "s", *bad)
    assert done.returncode != 0 and "hub-mosquitto.sh:" in done.stderr


def test_the_bridge_reaches_the_mid_s_broker_over_tls_and_never_carries_readings(tmp_path: Path) -> None:
    """The MID's broker: TLS with a certificate of the MID's CA, a login for the hub. The hub's Mosquitto runs the
    generated listener and bridge; a device at home (--device, its login made by the script) sends a report. The
    report crosses the bridge; the kitchen's reading sent before it does not."""
    mid_dir, conf, secrets = tmp_path / "mid", tmp_path / "conf.d", tmp_path / "secrets"
    tls = ensure_broker_tls(mid_dir / "tls", "riverside", ["127.0.0.1"])
    (tmp_path / "hub-password").write_text("p&ss|w/rd\n")
    mid_passwd = mid_dir / "passwd"
    for login, password in (("hub-7", "p&ss|w/rd"), ("observer", "observer-password")):
        subprocess.run(
            ["mosquitto_passwd", *(["-c"] if login == "hub-7" else []), "-b", str(mid_passwd), login, password],
            check=True,
            timeout=30,
        )
    tls_port, observer_port, hub_port = free_port(), free_port(), free_port()
    mid_conf = (
        f"per_listener_settings false\nallow_anonymous false\npassword_file {mid_passwd}\n"
        f"listener {observer_port} 127.0.0.1\n"
        f"listener {tls_port} 127.0.0.1\ncafile {tls.ca_cert}\ncertfile {tls.server_cert}\nkeyfile {tls.server_key}\n"
        "log_type all\nconnection_messages true\n"
    )
    generate(
        conf,
        secrets,
        "--port",
        str(hub_port),
        "--sensor",
        "kitchen",
        "--device",
        "d-1",
        "--bridge",
        f"127.0.0.1:{tls_port}",
        "--bridge-login",
        "hub-7",
        "--bridge-password-file",
        str(tmp_path / "hub-password"),
        "--bridge-ca",
        str(tls.ca_cert),
    )
    bridge = (conf / "midgate-bridge.conf").read_text()
    assert f"\nbridge_cafile {conf}/mid-ca.pem\n" in bridge and "\nremote_password p&ss|w/rd\n" in bridge

    async def observe() -> list[tuple[str, bytes]]:
        observer = aiomqtt.Client("127.0.0.1", observer_port, username="observer", password="observer-password")
        kitchen = aiomqtt.Client("127.0.0.1", hub_port, username="kitchen", password=secret(secrets, "kitchen"))
        device = aiomqtt.Client("127.0.0.1", hub_port, username="d-1", password=secret(secrets, "d-1"))
        async with observer, kitchen, device:
            await observer.subscribe("#", qos=1)
            await kitchen.publish("sensors/kitchen/state", b'{"temperature": 21.5}', qos=1)
            await device.publish("mid/riverside/dev/d-1/up/report", b"end", qos=1)
            return await _until_end(observer)

    with (
        running_mosquitto(mid_dir / "broker", mid_conf, observer_port) as mid_broker,
        running_mosquitto(tmp_path / "hub", f"include_dir {conf}\n", hub_port) as hub_broker,
    ):
        wait_until(lambda: "u'hub-7'" in mid_broker.log_text(), 30, "the hub's bridge logged in over TLS")
        seen = asyncio.run(observe())
        assert seen == [("mid/riverside/dev/d-1/up/report", b"end")], hub_broker.log_text()
