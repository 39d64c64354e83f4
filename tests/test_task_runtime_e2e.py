"""A task added at runtime trains on real processes: Mosquitto + `coordinator serve` + 2 enrolled `agent run`s, each
replaying a CSV of two accelerometer axes labelled healthy/worn that none of the built-in tasks takes. The operator
approves the spec with `midgate coordinator task add` while `serve` runs (no restart); a buyer sees it with
`midgate buyer tasks`, its signatures checked with the MID key; `midgate coordinator job start` runs it for its
recipe's 2 rounds; each agent fetched the spec from the MID, verified it and trained it with the vetted MLP family."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from agent_sensing import wait_loaded
from fl_stack import (
    enrol_agent,
    finished_job,
    logged_reports,
    midgate,
    start_federated_coordinator,
    start_job,
    stopping_federation,
)
from mqtt_fixtures import MessagingStack, wait_until
from test_task_specs import VIBRATION

from protocol.tasks.spec import parse_task_spec
from protocol.tasks.windows import WindowSet, window_fingerprint

pytest_plugins = ["mqtt_fixtures"]

JOB = "job-vibration"
SPEC = VIBRATION  # two accelerometer axes in g from a "vibration-rig", healthy/worn, the MLP family, 2 rounds
WINDOWS_PER_CLASS = 20


def vibration(rng: np.random.Generator, label: int, n: int) -> np.ndarray:
    """(n, 2, 16) windows: a worn bearing rattles at a higher frequency and amplitude."""
    t = np.arange(16) / 16
    freq, amp = (2.0, 0.5) if label == 0 else (6.0, 1.5)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2, 1))
    return (amp * np.sin(2 * np.pi * freq * t + phase) + rng.normal(0, 0.1, size=(n, 2, 16))).astype(np.float32)


def write_rig_csv(path: Path, seed: int) -> None:
    """Blocks of whole windows per class, so every 16 rows share one label."""
    rng = np.random.default_rng(seed)
    lines = ["t_ms,accel_x[g],accel_y[g],label"]
    t = 1_790_000_000_000
    for label, name in enumerate(SPEC["labels"]):  # type: ignore[arg-type]
        for window in vibration(rng, label, WINDOWS_PER_CLASS):
            for x, y in window.T:
                lines.append(f"{t},{x:.5f},{y:.5f},{name}")
                t += 10
    path.write_text("\n".join(lines) + "\n")


def rig_sensor_toml(path: Path) -> str:
    return f'\n[[sensors]]\ndriver = "replay"\nname = "rig"\npath = "{path}"\nspeed = "max"\nsource = "vibration-rig"\n'


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_task_added_at_runtime_trains_on_data_no_built_in_task_fits(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    start_federated_coordinator(stack)
    spec_file = stack.root / "vibration-fault.json"
    spec_file.write_text(json.dumps(SPEC, indent=2))
    added = midgate("coordinator", "task", "add", str(spec_file), "--config", str(stack.config))
    assert added.startswith("added: vibration-fault@1  classification  mlp-classifier"), added
    coordinator = f"http://127.0.0.1:{stack.http_port}"
    with urllib.request.urlopen(coordinator + "/v1/info", timeout=30) as answer:
        mid_key = json.loads(answer.read())["mid_key"]
    listed = midgate("buyer", "tasks", "--coordinator", coordinator, "--mid-key", mid_key).splitlines()
    assert [line.split()[0] for line in listed] == [
        "env-forecast@1",
        "host-anomaly@1",
        "plaid-appliance@1",
        "vibration-fault@1",
    ]

    agents = []
    for i in range(2):
        workdir = stack.root / f"agent-r{i}"
        workdir.mkdir()
        write_rig_csv(workdir / "rig.csv", seed=i)
        handle, record = enrol_agent(stack, f"r{i}", workdir, rig_sensor_toml(workdir / "rig.csv"))
        stack.start_agent(handle)
        agents.append((handle, record))
    for handle, _ in agents:
        wait_loaded(handle.data_dir / "samples.db", "rig")

    rng = np.random.default_rng(99)
    x = np.concatenate([vibration(rng, 0, 16), vibration(rng, 1, 16)])
    y = np.array([0] * 16 + [1] * 16, dtype=np.int64)
    validation = WindowSet(x=x, y=y, fingerprint=window_fingerprint(x, y))
    with stopping_federation(stack, agents) as teardown:
        job = start_job(stack, teardown, JOB, 2, task="vibration-fault@1", validation_set=validation)
        book = finished_job(stack, job, JOB, timeout_s=420)
        assert book.request.rounds == 2 and book.model_version is not None
        assert book.outcome is not None and 0.0 <= book.outcome.final_validation["accuracy"] <= 1.0
        expected = parse_task_spec(spec_file.read_bytes())
        for handle, _ in agents:
            handed = handle.data_dir / "mids" / stack.mid / "jobs" / JOB / "vibration-fault@1.json"
            assert parse_task_spec(handed.read_bytes()) == expected  # verified by the agent, trained by its ClientApp
        wait_until(lambda: len(logged_reports(stack)) >= 4, 60, "both devices' reports of both rounds logged")
        reports = [logged.report for logged in logged_reports(stack)]
        assert {(r.task_id, r.task_version) for r in reports} == {("vibration-fault", 1)}
        assert {r.round for r in reports} == {1, 2}
