"""The files deploy/raspberrypi installs are valid for the code they configure and for the tools that read them:
the config template loads (with the BME280 table install.sh adds when it finds one), install.sh is shellcheck
clean, and the systemd unit (with its I2C drop-in) passes `systemd-analyze verify`. The tool tests skip, saying
so, where the tool is missing (`make test` installs both)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.agent.config import AgentSettings
from edge.sensors.config import Bme280Config, LinuxConfig, MqttConfig
from protocol.tasks.spec import get_task

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "raspberrypi"
UNIT = "midgate-agent.service"
BME280_TABLE = '\n[[sensors]]\ndriver = "bme280"\nname = "bme280"\nbus_number = 1\naddress = 0x76\nperiod_ms = 10000\n'


def test_config_template_loads_with_and_without_a_bme280(tmp_path: Path) -> None:
    settings = AgentSettings.load(DEPLOY / "agent.toml.template")
    assert settings.data_dir == Path("/var/lib/midgate")
    assert [type(s) for s in settings.sensors] == [LinuxConfig]
    assert settings.sample_store.path == Path("/var/lib/midgate/samples.db")
    assert settings.keep_warm_executor is False  # torch is not kept resident on a 512 MB board
    with_bme = tmp_path / "agent.toml"
    with_bme.write_text((DEPLOY / "agent.toml.template").read_text() + BME280_TABLE)
    assert [type(s) for s in AgentSettings.load(with_bme).sensors] == [LinuxConfig, Bme280Config]
    assert BME280_TABLE.split("bus_number")[0] in (DEPLOY / "install.sh").read_text().replace("\\n", "\n")


def test_systemd_unit_runs_the_installed_agent_as_a_notify_service() -> None:
    unit = (DEPLOY / UNIT).read_text()
    # The lean daemon script (midgate_agent.py), which pyproject installs beside `midgate`.
    assert "ExecStart=/opt/midgate/venv/bin/midgate-agent --config /etc/midgate/agent.toml" in unit
    assert 'midgate-agent = "midgate_agent:main"' in (DEPLOY.parents[1] / "pyproject.toml").read_text()
    installer = (DEPLOY / "install.sh").read_text()
    assert "PREFIX=/opt/midgate\nVENV=$PREFIX/venv\n" in installer
    for line in ("Type=notify", "WatchdogSec=", "ProtectSystem=strict", "PrivateTmp=true", "NoNewPrivileges=true"):
        assert line in unit
    assert "\nCapabilityBoundingSet=\n" in unit and "\nPrivateDevices=true\n" in unit and "MemoryMax=" in unit


def test_install_script_pins_the_cpu_torch_on_every_architecture() -> None:
    """PyPI's torch 2.13.0 wheels are CUDA builds on aarch64 too (they require cuda-toolkit and nvidia-cudnn-cu13):
    only the local label `+cpu` keeps a Pi's resolve on PyTorch's CPU index, whatever `uname -m` says."""
    installer = (DEPLOY / "install.sh").read_text()
    version = re.search(r"^TORCH_VERSION=(\S+)$", installer, re.MULTILINE)
    assert version is not None and version.group(1).endswith("+cpu"), "torch must be pinned with its +cpu label"
    pip_args = installer.split("pip_args() {")[1].split("\n}\n")[0]
    assert "TORCH_CPU_INDEX" in pip_args and "uname" not in pip_args, pip_args


def test_a_hub_sensor_table_loads_as_an_mqtt_sensor_that_env_forecast_can_use(tmp_path: Path) -> None:
    """install.sh --hub-sensor kitchen appends hub-sensor.toml.template with the name filled in."""
    installer = (DEPLOY / "install.sh").read_text()
    assert 'sed "s/@NAME@/$name/g" "$PREFIX/deploy/hub-sensor.toml.template" >>"$CONF"' in installer
    config = tmp_path / "agent.toml"
    table = (DEPLOY / "hub-sensor.toml.template").read_text().replace("@NAME@", "kitchen")
    config.write_text((DEPLOY / "agent.toml.template").read_text() + table)
    _host, kitchen = AgentSettings.load(config).sensors
    assert isinstance(kitchen, MqttConfig) and kitchen.topic == "sensors/kitchen/state"
    assert kitchen.password_file == Path("/etc/midgate/hub/agent.secret") and "HUB_SECRETS=$CONF_DIR/hub" in installer
    forecast = get_task("env-forecast", 1)
    assert [(c.name, c.unit) for c in kitchen.shape().channels] == [(i.name, i.unit) for i in forecast.inputs]
    assert all(kitchen.source in i.sources for i in forecast.inputs)


@pytest.mark.parametrize("script", ["install.sh", "hub-mosquitto.sh"])
def test_install_scripts_are_shellcheck_clean(script: str) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is missing: 'apt-get install shellcheck' (make test installs it)")
    script = str(DEPLOY / script)
    done = subprocess.run(["shellcheck", "--severity=style", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _verify_root(tmp_path: Path, dropin: str | None) -> Path:
    """A root for `systemd-analyze verify --root`: the host's system units, ours, and a stand-in ExecStart binary
    (verify checks that it exists and is executable)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    shutil.copy(DEPLOY / UNIT, system / UNIT)
    if dropin is not None:
        (system / f"{UNIT}.d").mkdir()
        (system / f"{UNIT}.d" / "i2c.conf").write_text(dropin)
    binary = root / "opt/midgate/venv/bin/midgate-agent"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


@pytest.mark.parametrize("i2c", [False, True], ids=["no-i2c", "i2c-dropin"])
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, i2c: bool) -> None:
    if shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir():
        pytest.skip("systemd-analyze is missing: 'apt-get install systemd' (make test installs it)")
    # What install.sh writes for a BME280 on bus 1: the template and one DeviceAllow line per bus.
    dropin = (DEPLOY / "i2c.conf.template").read_text() + "DeviceAllow=/dev/i2c-1 rw\n" if i2c else None
    root = _verify_root(tmp_path, dropin)
    done = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", UNIT], capture_output=True, text=True, check=False
    )
    # A misspelt key or a bad value is only a warning (exit 0): any output at all fails the test.
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
