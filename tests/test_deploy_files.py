"""The files deploy/raspberrypi installs are valid for the code they configure."""

from __future__ import annotations

from pathlib import Path

from edge.agent.config import AgentSettings
from edge.sensors.config import Bme280Config, LinuxConfig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "raspberrypi"


def test_example_agent_config_loads_with_its_sensors() -> None:
    settings = AgentSettings.load(DEPLOY / "agent.example.toml")
    assert settings.data_dir == Path("/var/lib/midgate")
    assert [type(s) for s in settings.sensors] == [LinuxConfig, Bme280Config]
    assert settings.sample_store.path == Path("/var/lib/midgate/samples.db")


def test_systemd_unit_runs_the_agent_with_the_installed_config() -> None:
    unit = (DEPLOY / "midgate-agent.service").read_text()
    assert "ExecStart=/opt/midgate/.venv/bin/midgate agent run --config /etc/midgate/agent.toml" in unit
    assert "agent.example.toml" in (DEPLOY / "install.sh").read_text()
