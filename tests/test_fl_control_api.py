"""The SuperLink's Control API as `job start` calls it in process (coordinator.federation.control_api), against a
real SuperLink over TLS: a run submitted is one the SuperLink runs (its ServerApp reads the run config given), its
status is read as `flwr ls` prints it, a run is stopped, and what the SuperLink refuses is a RunControlError."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flower_fixtures import Federation, issue_superlink_tls, plaid_windows, running_federation

from coordinator.federation.control_api import ControlApi, RunControlError
from coordinator.federation.job import JobOutcome
from coordinator.federation.job_start import APP_DIR
from protocol.tasks.windows import save_window_file

pytestmark = pytest.mark.slow  # a real SuperLink and ServerApp processes


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    with running_federation(tmp_path) as fed:
        yield fed


@pytest.fixture
def control(federation: Federation) -> Iterator[ControlApi]:
    assert federation.superlink is not None
    api = ControlApi(federation.superlink.address, federation.superlink.tls.ca_cert)
    try:
        yield api
    finally:
        api.close()


def _run_config(federation: Federation, **overrides: str | int | float) -> dict[str, str | int | float]:
    validation = federation.root / "validation.npz"
    save_window_file(validation, plaid_windows("test"))
    return {
        "selected-nodes": "1 2",
        "validation-path": str(validation),
        "output-dir": str(federation.root / "jobs"),
        "num-rounds": 1,
        **overrides,
    }


def _wait_status(control: ControlApi, run_id: int, done: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    status = control.run_status(run_id)
    while not status.startswith(done) and time.monotonic() < deadline:
        time.sleep(0.2)
        status = control.run_status(run_id)
    return status


def test_a_run_the_serverapp_refuses_is_submitted_yet_finishes_failed(
    federation: Federation, control: ControlApi
) -> None:
    # The run config reaches the ServerApp with its types (a bool, a float, a string with a space), which refuses
    # drift correction under DP: submitting succeeds, the status says failed, and the outcome says why.
    config = _run_config(federation, **{"drift-correction": 1.0, "dp-clipping-norm": 0.1, "attribution": False})
    run_id = control.submit_run(APP_DIR, config)
    assert run_id > 0
    assert _wait_status(control, run_id, "finished") == "finished:failed"
    outcome = JobOutcome.read(federation.run_dir(run_id))
    assert outcome.status == "failed" and outcome.reason == "invalid_run_config"
    assert "drift-correction cannot be combined with DP" in outcome.detail


def test_a_running_run_is_stopped_and_a_finished_or_unknown_one_is_refused(
    federation: Federation, control: ControlApi
) -> None:
    # Its first round waits for nodes 1 and 2, which never come: the run lives until it is stopped.
    run_id = control.submit_run(APP_DIR, _run_config(federation, **{"join-timeout": 600.0}))
    assert _wait_status(control, run_id, "running") == "running"
    control.stop_run(run_id)
    assert _wait_status(control, run_id, "finished") == "finished:stopped"
    with pytest.raises(RunControlError, match="StopRun refused"):
        control.stop_run(run_id)
    with pytest.raises(RunControlError, match="ListRuns refused"):
        control.run_status(run_id + 1)


def test_a_superlink_not_signed_by_the_trusted_ca_is_refused(federation: Federation, tmp_path: Path) -> None:
    assert federation.superlink is not None
    other_ca = issue_superlink_tls(tmp_path / "other-ca", "other-mid").ca_cert
    api = ControlApi(federation.superlink.address, other_ca)
    try:
        with pytest.raises(RunControlError, match="ListRuns failed: ConnectError"):
            api.run_status(1)
    finally:
        api.close()
