"""A process midgate starts finds midgate's code whatever folder it runs in.

`python -m` and `python -c` put the working directory first on sys.path; a data folder there named like one of
midgate's packages (the demo's folder holds `coordinator/`, an operator may well have one) then shadows the package,
and the process dies with "No module named coordinator.federation.fleet_front". Seen when `make demo` ran from the
installed package, not from a source tree on PYTHONPATH.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from coordinator.federation.fleet_front import FleetFrontProcess
from demo.services import MIDGATE


def _shadowing_folder(tmp_path: Path) -> Path:
    for package in ("coordinator/federation", "edge/federated", "protocol", "midgate_cli"):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    return tmp_path


def test_the_fleet_front_starts_from_a_folder_holding_a_coordinator_folder(tmp_path: Path) -> None:
    front = FleetFrontProcess(
        "127.0.0.1", 1, "127.0.0.1:2", tmp_path / "ca", tmp_path / "cert", tmp_path / "key", tmp_path / "front.log"
    )
    done = subprocess.run(
        [*front.argv()[:4], "--help"], cwd=_shadowing_folder(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--upstream" in done.stdout


def test_the_demos_commands_run_from_its_own_folder(tmp_path: Path) -> None:
    done = subprocess.run(
        [*MIDGATE, "coordinator", "--help"], cwd=_shadowing_folder(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout
