"""The client lr schedule over a job's rounds (protocol.tasks.schedule): its values, that local training uses the
round's value, and that a job or a server message the schedule cannot serve is refused with a reason."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from pydantic import ValidationError

from coordinator.federation.job import JobRunConfig
from coordinator.federation.job_start import JobRequest
from edge.federated.client_app import app as client_app
from edge.federated.training import LocalTrainingConfig, train_round
from protocol.errors import MalformedError, Reason
from protocol.tasks.models import build_model, model_arrays
from protocol.tasks.schedule import LrSchedule, scheduled_lr
from protocol.tasks.spec import PLAID_APPLIANCE as SPEC
from protocol.tasks.windows import WindowSet, save_window_file, window_fingerprint

BASE = 0.006

# (schedule, step, steps, expected lr): cosine starts at the base lr, is half of it halfway, and never reaches 0;
# late-cosine holds the base lr for the first half, then follows a cosine twice as fast.
SCHEDULE_VALUES = [
    (LrSchedule.CONSTANT, 1, 40, BASE),
    (LrSchedule.CONSTANT, 40, 40, BASE),
    (LrSchedule.COSINE, 1, 40, BASE),
    (LrSchedule.COSINE, 21, 40, BASE / 2),
    (LrSchedule.COSINE, 11, 40, BASE * (1 + math.sqrt(0.5)) / 2),
    (LrSchedule.COSINE, 40, 40, BASE * (1 + math.cos(math.pi * 39 / 40)) / 2),
    (LrSchedule.COSINE, 1, 1, BASE),
    (LrSchedule.LATE_COSINE, 1, 40, BASE),
    (LrSchedule.LATE_COSINE, 21, 40, BASE),
    (LrSchedule.LATE_COSINE, 31, 40, BASE / 2),
    (LrSchedule.LATE_COSINE, 40, 40, BASE * (1 + math.cos(math.pi * 38 / 40)) / 2),
]


@pytest.mark.parametrize(("schedule", "step", "steps", "expected"), SCHEDULE_VALUES)
def test_the_lr_of_each_round(schedule: LrSchedule, step: int, steps: int, expected: float) -> None:
    assert scheduled_lr(schedule, BASE, step, steps) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("schedule", [LrSchedule.COSINE, LrSchedule.LATE_COSINE])
def test_a_decaying_schedule_never_grows_and_never_stops(schedule: LrSchedule) -> None:
    values = [scheduled_lr(schedule, BASE, r, 40) for r in range(1, 41)]
    assert values[0] == BASE
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert values[-1] > 0


@pytest.mark.parametrize("step", [0, 41])
def test_a_step_outside_the_schedule_is_refused_with_the_range_and_the_step(step: int) -> None:
    with pytest.raises(MalformedError) as caught:
        scheduled_lr(LrSchedule.COSINE, BASE, step, 40)
    assert caught.value.reason is Reason.MALFORMED
    assert caught.value.details == {"expected": "1..40", "found": step}


@pytest.mark.parametrize("base", [0.0, -0.001, math.inf, math.nan])
def test_a_base_lr_that_is_not_positive_and_finite_is_refused_with_it(base: float) -> None:
    with pytest.raises(MalformedError) as caught:
        scheduled_lr(LrSchedule.CONSTANT, base, 1, 40)
    found = caught.value.details["found"]
    assert found == base or (math.isnan(found) and math.isnan(base))


def _windows(n: int = 24) -> WindowSet:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, SPEC.channels, SPEC.window_length)).astype(np.float32)
    y = rng.integers(0, len(SPEC.labels), n)
    return WindowSet(x=x, y=y, fingerprint=window_fingerprint(x, y))


def _settings(**overrides: object) -> LocalTrainingConfig:
    config: dict[str, object] = {"task-id": SPEC.id, "task-version": SPEC.version, "lr": BASE, "batch-size": 8}
    config.update(overrides)
    return LocalTrainingConfig.from_run_config(config)


def test_a_cosine_round_trains_exactly_as_a_constant_round_at_that_rounds_lr() -> None:
    global_arrays = model_arrays(build_model(SPEC, seed=0))
    windows = _windows()
    cosine = _settings(**{"lr-schedule": "cosine", "num-rounds": 10})
    for server_round in (1, 7):
        lr = scheduled_lr(LrSchedule.COSINE, BASE, server_round, 10)
        fixed = _settings(lr=lr)
        scheduled = train_round(SPEC, global_arrays, windows, cosine, server_round).arrays
        expected = train_round(SPEC, global_arrays, windows, fixed, server_round).arrays
        assert all(np.array_equal(scheduled[name], expected[name]) for name in expected)
    base = train_round(SPEC, global_arrays, windows, _settings(), 7).arrays
    assert not all(np.array_equal(scheduled[name], base[name]) for name in base)


def test_a_schedule_that_does_not_know_the_jobs_length_or_is_unknown_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs num-rounds"):
        _settings(**{"lr-schedule": "cosine"})
    with pytest.raises(ValidationError, match="lr-schedule"):
        _settings(**{"lr-schedule": "linear", "num-rounds": 10})
    with pytest.raises(ValidationError, match="lr-schedule"):
        JobRunConfig.from_run_config(
            {
                "task-id": SPEC.id,
                "task-version": SPEC.version,
                "selected-nodes": "1 2",
                "validation-path": "v.npz",
                "output-dir": "out",
                "lr-schedule": "linear",
            }
        )


def test_the_job_request_sends_its_schedule_in_the_run_config(tmp_path: Path) -> None:
    request = JobRequest(
        job_id="job-1",
        task_id=SPEC.id,
        task_version=SPEC.version,
        rounds=40,
        validation_path=tmp_path / "val.npz",
        purpose="research",
        buyer="acme",
        lr_schedule=LrSchedule.COSINE,
    )
    run_config = request.run_config([11, 12], tmp_path)
    assert run_config["lr-schedule"] == "cosine"
    job = JobRunConfig.from_run_config(run_config)
    assert job.lr_schedule is LrSchedule.COSINE
    local = LocalTrainingConfig.from_run_config(run_config)
    assert local.round_lr(40) == scheduled_lr(LrSchedule.COSINE, local.lr, 40, 40)


def _train_message(server_round: int) -> Message:
    arrays = ArrayRecord({n: Array(a) for n, a in model_arrays(build_model(SPEC, seed=0)).items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
    # As the SuperNode hands it to the ClientApp: metadata set by the SuperLink, not by a ServerApp in this process.
    metadata = Metadata(
        run_id=1,
        message_id=f"train-{server_round}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)  # type: ignore[call-overload,no-any-return]


@pytest.mark.parametrize("server_round", [0, 4])
def test_the_clientapp_refuses_a_round_outside_the_job_before_training(tmp_path: Path, server_round: int) -> None:
    """The round number is the server's input to the schedule: a train message for round 0 or for round 4 of a
    3-round job is an error (Flower returns it to the ServerApp as the node's error reply), and no record is spooled."""
    save_window_file(tmp_path / "windows.npz", _windows())
    (tmp_path / "spool").mkdir()
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"data-path": str(tmp_path / "windows.npz"), "spool-dir": str(tmp_path / "spool")},
        state=RecordDict(),
        run_config={
            "task-id": SPEC.id,
            "task-version": SPEC.version,
            "num-rounds": 3,
            "lr": BASE,
            "lr-schedule": "cosine",
        },
    )
    with pytest.raises(MalformedError) as caught:
        client_app(_train_message(server_round), context)
    assert caught.value.details == {"expected": "1..3", "found": server_round}
    assert list((tmp_path / "spool").iterdir()) == []
    reply = client_app(_train_message(3), context)
    assert not reply.has_error()
    assert len(list((tmp_path / "spool").iterdir())) == 1
