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
