"""`midgate agent sensors list|sample|stats` through the real console-script app."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edge.agent.cli import app
from edge.sensors.store import SampleStore

runner = CliRunner()


def test_list_names_every_driver() -> None:
    result = runner.invoke(app, ["sensors", "list"])
    assert result.exit_code == 0, result.output
    for driver in ("simulated", "linux", "bme280", "replay"):
        assert driver in result.output


def test_sample_writes_the_store_and_stats_reports_it(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    result = runner.invoke(
        app,
        [
            "sensors",
            "sample",
            "-d",
            "simulated",
            "-d",
            "replay",
            "--rate",
            "50",
            "--seconds",
            "0.5",
            "--store",
            str(store),
        ],
    )
    assert result.exit_code == 0, result.output
    with SampleStore(store) as opened:
        by_sensor = {s.name: s for s in opened.stats().sensors}
        written = opened.count()
    assert set(by_sensor) == {"env", "plaid"}
    assert by_sensor["plaid"].labelled == by_sensor["plaid"].samples > 0
    assert f"wrote {written} samples" in result.output

    result = runner.invoke(app, ["sensors", "stats", "--store", str(store)])
    assert result.exit_code == 0, result.output
    assert "env" in result.output and "plaid" in result.output and f"{written} samples" in result.output


def test_an_unavailable_driver_is_skipped_with_its_reason(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["sensors", "sample", "-d", "bme280", "--seconds", "0.1", "--store", str(tmp_path / "s.db")]
    )
    assert result.exit_code == 1
    assert "skipping bme280" in result.output and "sensor_unavailable" in result.output


def test_stats_of_a_missing_store_fails_cleanly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sensors", "stats", "--store", str(tmp_path / "absent.db")])
    assert result.exit_code == 1 and "no sample store" in result.output


def test_an_unknown_driver_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sensors", "sample", "-d", "teleport", "--store", str(tmp_path / "s.db")])
    assert result.exit_code == 2 and "teleport" in result.output
    assert not (tmp_path / "s.db").exists()


def _agent_toml(tmp_path: Path, sensors: str) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nmin_job_windows = 3\n{sensors}')
    return config


def test_sample_with_the_agents_config_replays_a_chosen_file_into_the_agents_store(tmp_path: Path) -> None:
    recording = tmp_path / "kitchen.csv"
    recording.write_text(
        "t_ms,current[A],label\n" + "".join(f"{10 * k},{k % 7},{'on' if k % 2 else 'off'}\n" for k in range(50))
    )
    config = _agent_toml(
        tmp_path,
        f'[[sensors]]\ndriver = "replay"\nname = "kitchen"\npath = "{recording}"\nspeed = "max"\n'
        'class_names = ["off", "on"]\n',
    )
    result = runner.invoke(app, ["sensors", "sample", "--config", str(config)])  # only a load: ends when it is done
    assert result.exit_code == 0, result.output
    assert f"wrote 50 samples to {tmp_path / 'data' / 'samples.db'}" in result.output  # the store under data_dir

    stats = runner.invoke(app, ["sensors", "stats", "--config", str(config)])
    assert stats.exit_code == 0, stats.output
    assert "kitchen" in stats.output and "off, on" in stats.output and "50 samples" in stats.output

    result = runner.invoke(app, ["sensors", "sample", "--config", str(config)])
    assert "wrote 0 samples" in result.output  # loaded once: a second run does not load the file again


def test_windows_shows_what_a_job_would_get_or_why_it_would_be_declined(tmp_path: Path) -> None:
    config = _agent_toml(tmp_path, '[[sensors]]\ndriver = "replay"\nspeed = "max"\nseries = "0:12"\n')
    loaded = runner.invoke(app, ["sensors", "sample", "--config", str(config)])  # ends when the load is done
    assert loaded.exit_code == 0 and "wrote " in loaded.output, loaded.output
    out = tmp_path / "plaid.npz"
    result = runner.invoke(
        app, ["sensors", "windows", "--task", "plaid-appliance@1", "-c", str(config), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "12 windows of plaid-appliance@1 from sensor plaid; fingerprint merkle-sha256:" in result.output
    assert "per class:" in result.output and out.is_file()

    declined = runner.invoke(app, ["sensors", "windows", "--task", "env-forecast@1", "--config", str(config)])
    assert declined.exit_code == 1
    assert "would be declined" in declined.output and "lack ['temperature_c'" in declined.output


def test_drivers_on_the_command_line_and_a_config_do_not_mix(tmp_path: Path) -> None:
    config = _agent_toml(tmp_path, "")
    result = runner.invoke(app, ["sensors", "sample", "--config", str(config), "-d", "simulated"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["sensors", "sample", "--config", str(config), "--seconds", "0.1"])
    assert result.exit_code == 1 and "lists no [[sensors]]" in result.output
