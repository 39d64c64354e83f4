"""A real `midgate agent run` collects what its agent.toml lists: a live CSV replay (with a damaged line), the
simulated household, a recording loaded as fast as the store takes it, and a BME280 that is not there; the store fills
while it runs (polled, never slept on), `midgate agent status` (another process) shows each sensor's rate, last sample
and errors by kind, and why the agent is not connected, and SIGTERM leaves every sensor's last state in the store. No
broker runs: sensing does not wait for the MID."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from agent_sensing import member_of_an_unreachable_mid
from mqtt_fixtures import PYTHON, REPO, ServiceProcess, wait_until

from edge.sensors.errors import StoreNotReadyError
from edge.sensors.store import SampleStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _status(config: Path) -> str:
    return subprocess.run(
        [PYTHON, "-c", "from midgate_cli import app; app()", "agent", "status", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_agent_run_fills_the_store_from_its_config_and_status_shows_each_sensor(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    member_of_an_unreachable_mid(data_dir)
    meter = tmp_path / "meter.csv"
    meter.write_text(
        "t_ms,power_w[W],label\n"
        + "".join(f"{20 * k},{k},{'on' if k % 2 else 'off'}\n" for k in range(40))
        + "800,oops,on\n"
    )
    recording = tmp_path / "rec.ts"
    recording.write_text("@problemName R\n@univariate true\n@classLabel true a b\n@data\n1,2,3:a\n4,5:b\n6,7,8,9:a\n")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\nsensor_health_s = 0.5\nreconnect_min_s = 5.0\n'
        f'[[sensors]]\ndriver = "replay"\nname = "meter"\npath = "{meter}"\nspeed = 2.0\n'
        '[[sensors]]\ndriver = "simulated"\nname = "env"\nperiod_ms = 100\ndropout = 0\n'
        f'[[sensors]]\ndriver = "replay"\nname = "rec"\npath = "{recording}"\nspeed = "max"\n'
        'class_names = ["fan", "fridge"]\n'
        '[[sensors]]\ndriver = "bme280"\nname = "bme"\nbus_number = 250\n'
    )
    store_path = data_dir / "samples.db"
    agent = ServiceProcess("agent", ["agent", "run", "--config", str(config)], tmp_path / "agent.log")
    agent.start()
    try:

        def health() -> dict[str, tuple[str, int, dict[str, int]]]:
            if not store_path.exists():
                return {}
            try:
                with SampleStore(store_path, readonly=True) as store:
                    return {h.name: (h.state, h.samples, h.errors) for h in store.health()}
            except StoreNotReadyError:  # the daemon has created the file, not yet its schema
                return {}

        def collected() -> bool:
            seen = health()
            done = (
                seen.get("meter", ("", 0, {}))[2].get("malformed", 0) >= 1
                and seen.get("env", ("", 0, {}))[1] >= 10
                and seen.get("rec", ("",))[0] == "loaded"
            )
            return done or not agent.alive

        wait_until(collected, 120, "every sensor collected", poll_s=0.2)
        assert agent.alive, agent.log_text()
        seen = health()
        assert seen["bme"][0] == "unavailable" and seen["meter"][0] == seen["env"][0] == "sampling"
        with SampleStore(store_path, readonly=True) as store:
            first = store.count()
            assert store.classes("meter") == ("off", "on") and store.classes("rec") == ("fan", "fridge")

        def count() -> int:
            with SampleStore(store_path, readonly=True) as store:
                return store.count()

        wait_until(lambda: count() > first, 30, "the store growing")

        status = _status(config)
        rows = {line.split()[1]: line for line in status.splitlines() if line.startswith("│ ") and line.split()[1]}
        assert "sensors, as the agent saw them" in status, status
        assert "sampling" in rows["env"] and " s ago)" in rows["env"], status  # its rate, its last sample and when
        assert "sampling" in rows["meter"] and "malformed" in rows["meter"], status  # errors by kind
        assert "loaded" in rows["rec"] and "unavailable" in rows["bme"] and "I2C" in rows["bme"], status
        words = " ".join(status.split())  # the agent's own table: why it is not connected (cells may fold)
        assert "not connected to 127.0.0.1:" in words and "Connection refused" in words, status
    finally:
        agent.stop()
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log_text()
    final = health()
    assert {name: state for name, (state, _, _) in final.items()} == {
        "bme": "unavailable",
        "env": "stopped",
        "meter": "stopped",
        "rec": "loaded",
    }
