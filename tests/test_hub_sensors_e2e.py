"""Hub mode end to end with real processes: Mosquitto runs the configuration `install.sh --hub --hub-sensor kitchen`
writes (hub-mosquitto.sh), the agent's config holds the [[sensors]] table it appends (hub-sensor.toml.template), an
ESP32 (played by a publisher with the kitchen's login) sends readings and garbage, and a real `midgate agent run`
takes the readings into its sample store: `midgate agent sensors stats` shows them, `midgate agent status` the
refused messages by reason. No MID runs: sensing does not wait for it."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiomqtt
import pytest
from agent_sensing import member_of_an_unreachable_mid, sensor_state
from fl_stack import midgate
from mqtt_fixtures import REPO, ServiceProcess, free_port, running_mosquitto, wait_until

from edge.sensors.store import SampleStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

DEPLOY = REPO / "deploy" / "raspberrypi"


def _hub_config(conf: Path, secrets: Path, port: int) -> None:
    script = str(DEPLOY / "hub-mosquitto.sh")
    subprocess.run(
        [
            "bash",
            script,
            "--conf-dir",
            str(conf),
            "--secret-dir",
            str(secrets),
            "--port",
            str(port),
            "--sensor",
            "kitchen",
        ],
        check=True,
        timeout=60,
    )


def _agent_toml(path: Path, data_dir: Path, secrets: Path, port: int) -> None:
    table = (
        (DEPLOY / "hub-sensor.toml.template")
        .read_text()
        .replace("@NAME@", "kitchen")
        .replace("/etc/midgate/hub/agent.secret", str(secrets / "agent.secret"))
        .replace('driver = "mqtt"\n', f'driver = "mqtt"\nport = {port}\n')
    )
    path.write_text(
        f'data_dir = "{data_dir}"\nsensor_health_s = 0.5\nreconnect_min_s = 5.0\nmember_page_port = 0\n' + table
    )


async def _esp32(port: int, password: str, payloads: list[bytes]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, username="kitchen", password=password, identifier="esp32") as esp32:
        for payload in payloads:
            await esp32.publish("sensors/kitchen/state", payload, qos=1)


def test_agent_run_takes_an_esp32_s_readings_from_the_hub_s_mosquitto(tmp_path: Path) -> None:
    conf, secrets, port = tmp_path / "mosquitto-hub", tmp_path / "hub-secrets", free_port()
    _hub_config(conf, secrets, port)
    data_dir = tmp_path / "data"
    member_of_an_unreachable_mid(data_dir)
    config = tmp_path / "agent.toml"
    _agent_toml(config, data_dir, secrets, port)
    store_path = data_dir / "samples.db"
    kitchen_password = (secrets / "kitchen.secret").read_text().strip()

    with running_mosquitto(tmp_path / "broker", f"include_dir {conf}\n", port) as broker:
        agent = ServiceProcess("agent", ["agent", "run", "--config", str(config)], tmp_path / "agent.log")
        agent.start()
        try:
            subscribed = "midgate-sensor-kitchen 1 sensors/kitchen/state"
            wait_until(lambda: subscribed in broker.log_text() or not agent.alive, 90, "the agent subscribed", 0.2)
            assert agent.alive, agent.log_text()
            readings = [f'{{"temperature": {20 + k}, "humidity": 40, "pressure": 1013}}'.encode() for k in range(5)]
            garbage = [b"\x00\x01", b'{"temperature": 21}', b'{"temperature": "hot", "humidity": 1, "pressure": 2}']
            asyncio.run(_esp32(port, kitchen_password, readings[:2] + garbage + readings[2:]))

            def taken() -> bool:
                with SampleStore(store_path, readonly=True) as store:
                    [health] = [h for h in store.health() if h.name == "kitchen"]
                    return (store.count() == 5 and sum(health.errors.values()) == 3) or not agent.alive

            wait_until(lambda: sensor_state(store_path, "kitchen") == "sampling", 60, "kitchen sampling", 0.2)
            wait_until(taken, 60, "five readings stored and three refused", 0.2)
            assert agent.alive, agent.log_text()

            stats = midgate("agent", "sensors", "stats", "--config", str(config))
            [row] = [line for line in stats.splitlines() if "kitchen" in line]
            assert "temperature_c" in row and row.split("│")[4].strip() == "5", stats
            status = " ".join(midgate("agent", "status", "--config", str(config)).split())
            assert "not_json 1" in status and "missing_field 1" in status and "wrong_type 1" in status, status
        finally:
            agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log_text()
    with SampleStore(store_path, readonly=True) as store:
        assert [s.values[0] for s in store.latest("kitchen", 10)] == [24.0, 23.0, 22.0, 21.0, 20.0]
        assert "kitchen: not_json: message is not JSON" in (tmp_path / "agent.log").read_text()
