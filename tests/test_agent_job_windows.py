"""A job invitation makes the agent cut the task's windows from its own sample store, as the task spec says (segment
or sliding; labels by class name), into the job's folder, and hand that file to the SuperNode; a store without the
task's inputs, or with too few windows, declines the job with its reason. The SuperNode itself is a stand-in here
(tests/test_fl_roles.py runs the real one from a real `agent run`)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from test_agent_member_controls import _membership

import edge.federated.supervisor as supervisor_module
from edge.agent.controls.decisions import DeclineReason
from edge.agent.job_node import WINDOW_FILE, JobNode
from edge.agent.ledger_client import ProofUnavailableError, RefusedByMidError
from edge.federated.supernode import SuperNodeProcess
from edge.sensors.export import WindowSource
from edge.sensors.plaid import PLAID_CLASSES, load_plaid, plaid_files
from edge.sensors.replay import TsReplaySensor, plaid_replay
from edge.sensors.sample import ChannelSpec
from edge.sensors.simulated import SimulatedEnvironmentSensor
from edge.sensors.store import SampleStore, write_all
from edge.sensors.tsfile import read_ts
from protocol.identity import SignerKey
from protocol.messages import RoundInvitation
from protocol.tasks.signed import seal_task_spec
from protocol.tasks.spec import (
    PLAID_APPLIANCE,
    REGISTRY,
    ModelFamily,
    ModelSpec,
    TaskKind,
    TaskSpec,
    get_task,
    load_task,
)
from protocol.tasks.windows import load_window_file

RECORDINGS = 30


class StandInSupervisor:
    """Records the SuperNode the agent would start, without starting Flower."""

    started: ClassVar[list[SuperNodeProcess]] = []

    def __init__(self, make: Callable[[], SuperNodeProcess]) -> None:
        self.make = make

    async def __aenter__(self) -> StandInSupervisor:
        StandInSupervisor.started.append(self.make())
        return self

    async def stop(self) -> None:
        pass


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[JobNode, SignerKey]:
    # JobNode imports its supervisor when a job starts (edge.agent.job_node): the stand-in is found there.
    monkeypatch.setattr(supervisor_module, "SuperNodeSupervisor", StandInSupervisor)
    StandInSupervisor.started = []
    membership, mid_key = _membership(tmp_path)  # the device of a MID that runs a SuperLink
    return JobNode(membership, tmp_path / "spool", WindowSource(tmp_path / "samples.db", min_windows=5)), mid_key


def invite(node: JobNode, mid_key: SignerKey, job: str, task: str) -> None:
    now = time.time_ns() // 1_000_000
    task_id, _, version = task.partition("@")
    payload = RoundInvitation(
        job_id=job,
        run_id=1,
        round=1,
        task_id=task_id,
        task_version=int(version),
        purpose="research",
        buyer="acme",
        nonce=secrets.token_hex(16),
        issued_ms=now,
        deadline_ms=now + 60_000,
    ).seal(mid_key)
    asyncio.run(node.invited(payload))


def plaid_store(path: Path, recordings: int = RECORDINGS) -> None:
    sensor = plaid_replay(split="train", series=range(recordings), loop=False)
    with SampleStore(path) as store:
        store.register(sensor.name, sensor.channels, sensor.class_names, sensor.source)
        write_all(store, sensor.samples(1_790_000_000_000))


def job_windows(node: JobNode, job: str) -> Path:
    path = node.membership.directory / "jobs" / job / WINDOW_FILE
    assert [p.data_path for p in StandInSupervisor.started] == [path]  # the file the SuperNode trains on
    return path


def test_plaid_windows_are_cut_in_segment_mode_one_per_recording(node: tuple[JobNode, SignerKey]) -> None:
    agent, mid_key = node
    plaid_store(agent.windows.store_path)
    invite(agent, mid_key, "job-1", "plaid-appliance@1")
    assert agent.job is not None and agent.declined == 0
    cut = load_window_file(job_windows(agent, "job-1"), PLAID_APPLIANCE)
    reference = load_plaid("train")
    assert cut.x.shape == (RECORDINGS, 1, 128) and cut.fingerprint.startswith("merkle-sha256:")
    np.testing.assert_array_equal(cut.y, reference.y[:RECORDINGS])
    np.testing.assert_allclose(cut.x[:, 0], reference.X[:RECORDINGS], rtol=1e-6)


def test_a_sliding_task_gets_sliding_windows_labelled_by_class_name(
    node: tuple[JobNode, SignerKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task no code names: its spec alone (sliding, stride, its own class order) decides how windows are cut."""
    spec = TaskSpec(
        id="appliance-sliding",
        version=1,
        kind=TaskKind.CLASSIFICATION,
        inputs=PLAID_APPLIANCE.inputs,
        window_length=32,
        labels=tuple(reversed(PLAID_CLASSES)),
        window_mode="sliding",
        window_stride=16,
        model=ModelSpec(family=ModelFamily.CONV1D_CLASSIFIER, hidden=8),
    )
    monkeypatch.setitem(REGISTRY, (spec.id, spec.version), spec)
    agent, mid_key = node
    plaid_store(agent.windows.store_path)
    invite(agent, mid_key, "job-2", "appliance-sliding@1")
    cut = load_window_file(job_windows(agent, "job-2"), get_task("appliance-sliding", 1))
    assert cut.y is not None
    reference = load_plaid("train")
    lengths = [s.values.shape[1] for s in read_ts(plaid_files("train")[0]).series[:RECORDINGS]]
    assert len(cut.x) == sum((n - 32) // 16 + 1 for n in lengths)  # windows never straddle two recordings
    # PLAID's label i is the task's class 10 - i: mapped by name, never taken as an index.
    assert set(cut.y.tolist()) == {10 - int(label) for label in reference.y[:RECORDINGS]}


def test_a_forecast_task_is_cut_from_the_sensor_that_has_its_features(node: tuple[JobNode, SignerKey]) -> None:
    agent, mid_key = node
    plaid_store(agent.windows.store_path)  # a second sensor that does not fit: it is passed over
    env = SimulatedEnvironmentSensor("env", device="a", dropout=0)
    with SampleStore(agent.windows.store_path) as store:
        store.register("env", env.channels, source=env.source)
        write_all(store, (env.read(t) for t in range(0, 660_000, 1000)))
    invite(agent, mid_key, "job-3", "env-forecast@1")
    cut = load_window_file(job_windows(agent, "job-3"), get_task("env-forecast", 1))
    assert cut.x.shape == (20, 3, 32) and cut.y is not None and cut.y.shape == (20, 3)  # 660 samples / 33


def test_a_store_without_the_tasks_inputs_declines_with_the_reason(
    node: tuple[JobNode, SignerKey], caplog: pytest.LogCaptureFixture
) -> None:
    agent, mid_key = node
    plaid_store(agent.windows.store_path)
    with caplog.at_level(logging.INFO, logger="midgate.agent.job"):
        invite(agent, mid_key, "job-4", "env-forecast@1")
        invite(agent, mid_key, "job-4", "env-forecast@1")  # re-invited: already declined, not cut again
    assert agent.job is None and StandInSupervisor.started == []
    assert agent.declined == 1 and agent.data_declines == {DeclineReason.NO_FITTING_DATA: 1}
    declined = [r.getMessage() for r in caplog.records if "declined" in r.getMessage()]
    assert len(declined) == 1 and "no_fitting_data" in declined[0] and "lack ['temperature_c'" in declined[0]
    assert not (agent.membership.directory / "jobs" / "job-4" / WINDOW_FILE).exists()


def test_labels_named_otherwise_than_the_tasks_classes_decline(node: tuple[JobNode, SignerKey]) -> None:
    agent, mid_key = node
    with SampleStore(agent.windows.store_path) as store:
        store.register("meter", (ChannelSpec("current", "A"),), ("kettle", "toaster"), source="plaid")
        store.register("bare", (ChannelSpec("current", "A"),), source="plaid")
    invite(agent, mid_key, "job-5", "plaid-appliance@1")
    assert agent.job is None and agent.data_declines == {DeclineReason.NO_FITTING_DATA: 1}
    assert "no_fitting_data" in str(agent._unfit["job-5"])
    assert "are not the task's" in str(agent._unfit["job-5"]) and "no class names" in str(agent._unfit["job-5"])


def test_a_series_of_another_origin_is_refused_not_trained_as_appliances(
    node: tuple[JobNode, SignerKey], tmp_path: Path
) -> None:
    """A univariate recording of anything is named "current" by the replay, and even with PLAID's class names it
    is not PLAID: the task takes only its declared sources and units, and says why it refused."""
    agent, mid_key = node
    foreign = TsReplaySensor("vibration", plaid_files("train"), series=range(RECORDINGS), loop=False)
    assert foreign.channels == (ChannelSpec("current", ""),) and foreign.source == "replay"
    wrong_unit = TsReplaySensor(
        "amps", plaid_files("train"), series=range(RECORDINGS), loop=False, channel_units=("mA",), source="plaid"
    )
    with SampleStore(agent.windows.store_path) as store:
        for sensor in (foreign, wrong_unit):
            store.register(sensor.name, sensor.channels, PLAID_CLASSES, sensor.source)
            write_all(store, sensor.samples(1_795_000_000_000))
    invite(agent, mid_key, "job-7", "plaid-appliance@1")
    assert agent.job is None and agent.data_declines == {DeclineReason.NO_FITTING_DATA: 1}
    why = str(agent._unfit["job-7"])
    assert "source 'replay' is not one of ['plaid']" in why and "current in 'mA', not 'A'" in why
    assert not (agent.membership.directory / "jobs" / "job-7" / WINDOW_FILE).exists()


def test_too_few_windows_and_an_unknown_task_decline(node: tuple[JobNode, SignerKey]) -> None:
    agent, mid_key = node
    plaid_store(agent.windows.store_path, recordings=3)  # the node needs 5
    invite(agent, mid_key, "job-6", "plaid-appliance@1")
    invite(agent, mid_key, "job-7", "plaid-appliance@9")
    assert agent.job is None and StandInSupervisor.started == []
    assert agent.data_declines == {DeclineReason.TOO_FEW_WINDOWS: 1, DeclineReason.UNKNOWN_TASK: 1}
    assert "found=3, needed=5" in str(agent._unfit["job-6"])


def signed_by(key: SignerKey, spec: TaskSpec) -> Callable[[str, int], bytes]:
    """A MID answering `GET /v1/tasks/...` with `spec` sealed by `key`."""
    return lambda task_id, version: seal_task_spec(spec, key)


def test_a_task_spec_the_mid_signed_is_fetched_verified_and_handed_to_the_clientapp(
    node: tuple[JobNode, SignerKey],
) -> None:
    agent, mid_key = node
    spec = PLAID_APPLIANCE.model_copy(
        update={"id": "appliance-mlp", "model": ModelSpec(family=ModelFamily.MLP_CLASSIFIER, hidden=8)}
    )
    agent.task_specs = signed_by(mid_key, spec)
    plaid_store(agent.windows.store_path)
    invite(agent, mid_key, "job-8", "appliance-mlp@1")
    path = job_windows(agent, "job-8")
    assert load_task(path.parent, "appliance-mlp", 1) == spec
    assert load_window_file(path, spec).x.shape == (RECORDINGS, 1, 128)


@pytest.mark.parametrize("attack", ["unsigned", "tampered", "changed-built-in"])
def test_a_spec_not_signed_by_the_mid_or_tampered_is_refused_and_nothing_runs(
    node: tuple[JobNode, SignerKey], attack: str
) -> None:
    agent, mid_key = node
    plaid_store(agent.windows.store_path)
    if attack == "unsigned":  # signed, but by another key than the MID's (a buyer's, another MID's)
        agent.task_specs = signed_by(SignerKey.generate("acme"), PLAID_APPLIANCE)
        expected = "unknown_key"
    elif attack == "tampered":
        genuine = json.loads(seal_task_spec(PLAID_APPLIANCE, mid_key))
        payload = base64.b64decode(genuine["payload"]).replace(b'"hidden":64', b'"hidden":65')
        genuine["payload"] = base64.b64encode(payload).decode()
        agent.task_specs = lambda task_id, version: json.dumps(genuine).encode()
        expected = "bad_signature"
    else:  # the MID's own signature over other contents under a built-in's id@version
        changed = PLAID_APPLIANCE.model_copy(
            update={"model": ModelSpec(family=ModelFamily.CONV1D_CLASSIFIER, hidden=32)}
        )
        agent.task_specs = signed_by(mid_key, changed)
        expected = "differs from the published one"
    invite(agent, mid_key, "job-9", "plaid-appliance@1")
    assert agent.job is None and StandInSupervisor.started == []
    assert agent.data_declines == {DeclineReason.TASK_SPEC_REFUSED: 1}
    assert expected in str(agent._unfit["job-9"])
    assert not (agent.membership.directory / "jobs" / "job-9" / WINDOW_FILE).exists()


def test_a_task_the_mid_does_not_have_is_declined_and_an_unreachable_mid_leaves_the_built_ins(
    node: tuple[JobNode, SignerKey],
) -> None:
    agent, mid_key = node
    plaid_store(agent.windows.store_path)

    def unknown(task_id: str, version: int) -> bytes:
        raise RefusedByMidError(404, "unknown_task", "unknown task")

    def unreachable(task_id: str, version: int) -> bytes:
        raise ProofUnavailableError("connection refused")

    agent.task_specs = unknown
    invite(agent, mid_key, "job-10", "vibration-fault@1")
    agent.task_specs = unreachable
    invite(agent, mid_key, "job-11", "vibration-fault@1")
    assert agent.data_declines == {DeclineReason.UNKNOWN_TASK: 2}
    invite(agent, mid_key, "job-12", "plaid-appliance@1")
    assert agent.job is not None and agent.job.job_id == "job-12"


def test_windows_are_cut_only_from_the_sensors_the_members_consent_lets_the_task_use(
    node: tuple[JobNode, SignerKey], tmp_path: Path
) -> None:
    """env-forecast takes simulated or bme280 data; the store has a simulated sensor. Consent that lets the task use
    linux data only declines the job (consent_excludes, nothing cut); bme280 only: the simulated sensor is not
    offered (no fitting data); simulated allowed: the job is cut from it."""
    from edge.agent.controls.state import MemberState, allow_sensors, every_sensor
    from protocol.messages import consent_sensor_gap

    agent, mid_key = node
    env = SimulatedEnvironmentSensor("env", device="a", dropout=0)
    with SampleStore(agent.windows.store_path) as store:
        store.register("env", env.channels, source=env.source)
        write_all(store, (env.read(t) for t in range(0, 660_000, 1000)))
    now = 1_790_000_000_000
    chosen = {"state": allow_sensors(MemberState(), now, "env-forecast", ["linux"])}
    agent.sensors = lambda task, usable: consent_sensor_gap(chosen["state"].task_sensors, task, usable)
    invite(agent, mid_key, "job-5", "env-forecast@1")
    assert agent.job is None and agent.data_declines == {DeclineReason.CONSENT_EXCLUDES: 1}
    assert not (agent.membership.directory / "jobs" / "job-5" / WINDOW_FILE).exists()
    chosen["state"] = allow_sensors(
        every_sensor(chosen["state"], now + 1, "env-forecast"), now + 2, "env-forecast", ["bme280"]
    )
    invite(agent, mid_key, "job-6", "env-forecast@1")
    assert agent.job is None and agent.data_declines[DeclineReason.NO_FITTING_DATA] == 1
    chosen["state"] = allow_sensors(chosen["state"], now + 3, "env-forecast", [env.source])
    invite(agent, mid_key, "job-7", "env-forecast@1")
    cut = load_window_file(job_windows(agent, "job-7"), get_task("env-forecast", 1))
    assert cut.x.shape == (20, 3, 32)
