"""`midgate coordinator job start`'s pieces without Flower: which devices a job invites, the signed invitation each
receives and how it is published, the request's refusals, the job book, and when a job counts as succeeded. The whole
command runs end to end, against Mosquitto, `serve`'s SuperLink and real agents, in tests/test_fl_roles_e2e.py."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as paho
import pytest
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum
from job_requests import job_request
from mqtt_fixtures import MosquittoProcess, free_port, wait_until
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import ValidationError

from coordinator.federation.job import JobOutcome, JobRunConfig
from coordinator.federation.job_start import (
    BrokerLogin,
    InvitationSender,
    JobBook,
    JobDevice,
    JobRecord,
    JobRequest,
    JobRequestError,
    job_succeeded,
    member_groups,
    round_invitation,
    rounds_captured,
    select_devices,
)
from coordinator.federation.server_app import aggregator
from coordinator.mid_key import mid_key_name
from coordinator.registry.store import Registry
from protocol.envelope import decode, open_envelope
from protocol.errors import BadSignatureError, ProtocolError
from protocol.identity import SignerKey
from protocol.messages import RoundInvitation
from protocol.tasks.schedule import LrSchedule
from protocol.topics import DownKind, down_topic

pytest_plugins = ["mqtt_fixtures"]
NOW_MS = 1_795_000_000_000


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """Three enrolled devices: d-one and d-two with Flower nodes, d-bare without; d-two is then revoked."""
    reg = Registry(tmp_path / "registry.sqlite")
    for device, node in (("d-one", 11), ("d-two", 22), ("d-bare", None)):
        reg.add_invite(f"inv-{device}", f"member-{device}", NOW_MS, NOW_MS + 10_000)
        reg.redeem_invite(f"inv-{device}", NOW_MS, device, SignerKey.generate(device).verifier, "$7$101$x$y")
        if node is not None:
            reg.add_flower_node(device, node, f"ecdsa-sha2-nistp256 {device}", NOW_MS)
    return reg


def test_all_online_invites_every_active_device_with_a_flower_node(registry: Registry) -> None:
    chosen = select_devices(registry, ())
    assert [(d.device_id, d.member_id, d.node_id) for d in chosen] == [
        ("d-one", "member-d-one", 11),
        ("d-two", "member-d-two", 22),
    ]
    registry.revoke("d-two", NOW_MS + 1)
    assert [d.device_id for d in select_devices(registry, ())] == ["d-one"]


@pytest.mark.parametrize(
    ("names", "reason"),
    [(("d-one", "d-nobody"), "unknown_device"), (("d-bare",), "no_flower_node"), (("d-two",), "revoked_device")],
)
def test_named_devices_must_be_enrolled_active_and_have_a_flower_node(
    registry: Registry, names: tuple[str, ...], reason: str
) -> None:
    registry.revoke("d-two", NOW_MS + 1)
    with pytest.raises(JobRequestError) as err:
        select_devices(registry, names)
    assert err.value.reason == reason
    assert err.value.details["device"] == names[-1]


def test_no_device_to_invite_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JobRequestError) as err:
        select_devices(Registry(tmp_path / "empty.sqlite"), ())
    assert err.value.reason == "no_devices"


def test_invitation_is_signed_by_the_mid_and_expires_one_lease_later(tmp_path: Path) -> None:
    mid_key = SignerKey.generate(mid_key_name("riverside"))
    request = job_request(tmp_path, lease_s=90)
    payload = round_invitation(request, run_id=7, server_round=2, nonce="ab" * 16, now_ms=NOW_MS, mid_key=mid_key)
    verifier = mid_key.verifier
    invitation = decode(
        open_envelope(payload, {verifier.key_id.hex(): verifier}, RoundInvitation.PAYLOAD_TYPE), RoundInvitation
    )
    assert (invitation.job_id, invitation.run_id, invitation.round) == ("job-1", 7, 2)
    assert (invitation.task_id, invitation.task_version, invitation.purpose, invitation.buyer) == (
        "plaid-appliance",
        1,
        "research",
        "acme",
    )
    assert invitation.deadline_ms - invitation.issued_ms == 90_000
    other = SignerKey.generate(mid_key_name("other")).verifier
    with pytest.raises(ProtocolError) as err:
        open_envelope(payload, {verifier.key_id.hex(): other}, RoundInvitation.PAYLOAD_TYPE)
    assert isinstance(err.value, BadSignatureError)


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"task_version": 99}, "plaid-appliance"),
        ({"devices": ("d-one",), "min_nodes": 2}, "min_nodes 2 exceeds"),
        ({"devices": ("d-one", "d-one")}, "named twice"),
        ({"dp_noise_multiplier": 1.0}, "clipping norm"),
        ({"drift_correction": 1.0, "dp_clipping_norm": 1.0}, "drift correction cannot be combined with DP"),
        ({"drift_correction": 1.5}, "drift_correction"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"job_id": "Job 1"}, "job_id"),
        ({"lease_s": 1}, "lease_s"),
        ({"tail_average": 3}, "exceeds the job's 2 rounds"),
        ({"aggregation": "krum", "dp_clipping_norm": 1.0}, "cannot be combined with DP"),
        ({"aggregation": "fedmedian", "server_momentum": 0.5}, "cannot be combined with DP or server momentum"),
        ({"aggregation": "geomedian"}, "aggregation"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_request_refuses_what_cannot_run(tmp_path: Path, overrides: dict[str, object], complaint: str) -> None:
    with pytest.raises((ValidationError, KeyError, LookupError, ValueError)) as err:
        job_request(tmp_path, **overrides)
    assert complaint in str(err.value)


def test_run_config_names_the_selected_nodes_and_the_job_folder(tmp_path: Path) -> None:
    request = job_request(tmp_path, round_timeout_s=30, dp_clipping_norm=1.5)
    config = request.run_config([11, 22], tmp_path / "jobs" / "job-1")
    assert config["selected-nodes"] == "11 22"
    assert config["output-dir"] == str((tmp_path / "jobs" / "job-1").resolve())
    assert (config["num-rounds"], config["round-timeout"], config["dp-clipping-norm"]) == (2, 30, 1.5)


def test_drift_correction_momentum_and_lr_schedule_reach_the_serverapps_run_config(tmp_path: Path) -> None:
    request = job_request(tmp_path, drift_correction=1.0, server_momentum=0.5, lr_schedule="late-cosine")
    parsed = JobRunConfig.from_run_config(request.run_config([11, 22], tmp_path / "jobs" / "job-1"))
    assert (parsed.drift_correction, parsed.server_momentum, parsed.selected_nodes) == (1.0, 0.5, (11, 22))
    assert parsed.lr_schedule is LrSchedule.LATE_COSINE
    constant = job_request(tmp_path, lr_schedule="constant")
    assert JobRunConfig.from_run_config(constant.run_config([11], tmp_path)).lr_schedule == "constant"
    averaged = job_request(tmp_path, tail_average=2)
    assert JobRunConfig.from_run_config(averaged.run_config([11], tmp_path)).tail_average == 2


@pytest.mark.parametrize(
    ("aggregation", "strategy"),
    [("fedmedian", FedMedian), ("fedtrimmedavg", FedTrimmedAvg), ("krum", Krum), ("bulyan", Bulyan)],
)
def test_a_robust_aggregation_reaches_the_serverapp_as_flowers_strategy_without_the_recipes_momentum(
    tmp_path: Path, aggregation: str, strategy: type
) -> None:
    request = job_request(tmp_path, rounds=None, aggregation=aggregation)  # the PLAID recipe has momentum 0.7
    assert request.server_momentum == 0.0
    parsed = JobRunConfig.from_run_config(request.run_config(list(range(11, 22)), tmp_path))
    assert parsed.aggregation == aggregation
    built = aggregator(parsed)
    assert type(built) is strategy
    if isinstance(built, (Krum, Bulyan)):
        assert built.num_malicious_nodes == 2  # (11 selected - 3) // 4


def test_a_job_given_only_a_task_runs_the_tasks_measured_recipe_with_attribution(tmp_path: Path) -> None:
    request = job_request(tmp_path, rounds=None)
    assert (request.rounds, request.local_epochs, request.batch_size, request.lr) == (60, 1, 8, 0.006)
    assert (request.lr_schedule, request.server_momentum, request.drift_correction) == ("late-cosine", 0.7, 1.0)
    assert (request.tail_average, request.attribution) == (10, True)
    config = request.run_config([11, 22], tmp_path)
    assert (config["batch-size"], config["lr"], config["attribution"]) == (8, 0.006, True)
    parsed = JobRunConfig.from_run_config(config)
    assert (parsed.num_rounds, parsed.tail_average, parsed.server_momentum, parsed.attribution) == (60, 10, 0.7, True)
    # A task without a measured recipe keeps the generic one.
    generic = job_request(tmp_path, task_id="env-forecast", rounds=None)
    assert (generic.rounds, generic.lr_schedule, generic.drift_correction, generic.batch_size) == (3, "constant", 0, 32)


def test_what_the_operator_gives_overrides_the_recipe_which_fits_around_it(tmp_path: Path) -> None:
    short = job_request(tmp_path, rounds=5, lr=0.01, attribution=False)
    assert (short.rounds, short.tail_average, short.lr, short.batch_size, short.attribution) == (5, 5, 0.01, 8, False)
    assert job_request(tmp_path, rounds=20).tail_average == 10
    # DP and the recipe's drift correction cannot go together: without --drift-correction a DP job runs without it;
    # asked for explicitly, it is refused (test_request_refuses_what_cannot_run).
    assert job_request(tmp_path, dp_clipping_norm=1.0).drift_correction == 0.0
    # What the book stored reads back unchanged, not re-filled from a recipe that may have changed since.
    assert JobRequest.model_validate_json(short.model_dump_json()) == short


def test_a_members_devices_reach_the_serverapp_as_one_owner(tmp_path: Path) -> None:
    invited = [
        JobDevice(device_id="pi-1", member_id="alice", node_id=11),
        JobDevice(device_id="phone", member_id="bob", node_id=22),
        JobDevice(device_id="pi-2", member_id="alice", node_id=33),
        JobDevice(device_id="pi-3", member_id="alice", node_id=44),
    ]
    assert member_groups(invited) == [[11, 33, 44]]
    config = job_request(tmp_path).run_config([11, 22, 33, 44], tmp_path, member_groups=member_groups(invited))
    assert config["member-groups"] == "11,33,44"
    owners = JobRunConfig.from_run_config(config).owner_of()
    assert owners[11] == owners[33] == owners[44] != owners[22]
    assert JobRunConfig.from_run_config(job_request(tmp_path).run_config([11, 22], tmp_path)).member_groups == ()
    for wrong in ("11", "11,55", "11,22 22,33", "11,x"):
        with pytest.raises(ValidationError, match="member-groups"):
            JobRunConfig.from_run_config({**config, "member-groups": wrong})


@pytest.mark.parametrize("accelerated", [True, False])
def test_the_mids_flower_acceleration_switch_reaches_the_serverapps_run_config(
    tmp_path: Path, accelerated: bool
) -> None:
    config = job_request(tmp_path).run_config([11], tmp_path, flower_acceleration=accelerated)
    assert JobRunConfig.from_run_config(config).flower_acceleration is accelerated
    assert JobRunConfig.from_run_config(job_request(tmp_path).run_config([11], tmp_path)).flower_acceleration


def test_job_book_keeps_records_across_reads(tmp_path: Path) -> None:
    book = JobBook(tmp_path / "jobs")
    record = JobRecord(
        request=job_request(tmp_path),
        invited=[JobDevice(device_id="d-one", member_id="m", node_id=11)],
        nonces={"d-one": "ab" * 16},
        started_ms=NOW_MS,
    )
    book.write(record)
    record.status = "completed"
    record.outcome = JobOutcome(
        run_id=5,
        status="finished",
        rounds_completed=2,
        validation={0: {"accuracy": 0.1}, 2: {"accuracy": 0.3}},
        round_seconds={2: 4.5},
    )
    book.write(record)
    again = book.read("job-1")
    assert again is not None and again.status == "completed" and again.outcome == record.outcome
    assert [r.request.job_id for r in book.records()] == ["job-1"]
    assert book.read("job-2") is None


def test_rounds_captured_counts_round_summaries_only(tmp_path: Path) -> None:
    (tmp_path / "round-000001.json").write_text("{}")
    (tmp_path / "round-000002.json").write_text("{}")
    (tmp_path / "round-000002-node-11.npz").write_bytes(b"")
    (tmp_path / "outcome.json").write_text("{}")
    assert rounds_captured(tmp_path) == 2
    assert rounds_captured(tmp_path / "missing") == 0


@pytest.mark.parametrize(
    ("status", "outcome", "succeeded"),
    [
        ("finished:completed", JobOutcome(run_id=1, status="finished", rounds_completed=2), True),
        ("finished:completed", JobOutcome(run_id=1, status="failed", reason="too_few_replies"), False),
        ("finished:completed", JobOutcome(run_id=1, status="finished", rounds_completed=1), False),
        ("finished:completed", None, False),  # `flwr run` said nothing failed, but the ServerApp left no outcome
        ("finished:failed", JobOutcome(run_id=1, status="finished", rounds_completed=2), False),
        ("running", JobOutcome(run_id=1, status="finished", rounds_completed=2), False),
    ],
)
def test_a_job_succeeds_only_when_the_run_completed_and_the_outcome_has_every_round(
    status: str, outcome: JobOutcome | None, succeeded: bool
) -> None:
    assert job_succeeded(status, outcome, rounds=2) is succeeded


def test_invitations_are_published_at_qos_1_and_an_unreachable_broker_is_a_job_error(
    mosquitto: MosquittoProcess,
) -> None:
    got: list[tuple[str, bytes]] = []
    device = paho.Client(CallbackAPIVersion.VERSION2, client_id="d-one", protocol=paho.MQTTv5)
    device.on_message = lambda c, u, m: got.append((m.topic, bytes(m.payload)))
    device.on_subscribe = lambda c, u, mid, rcs, p: got.append(("subscribed", b""))
    device.connect("127.0.0.1", mosquitto.port)
    device.loop_start()
    try:
        device.subscribe("mid/riverside/dev/+/down/#", qos=1)
        wait_until(lambda: bool(got), 10, "the device's subscription")
        sent = [(down_topic("riverside", d, DownKind.INVITE), f"invitation for {d}".encode()) for d in ("a", "b")]
        with InvitationSender(BrokerLogin("127.0.0.1", mosquitto.port, "coordinator", "", "job-1")) as sender:
            sender.send_all(sent)
        wait_until(lambda: len(got) == 3, 10, "both invitations")
        assert sorted(got[1:]) == sorted(sent)
    finally:
        device.loop_stop()
        device.disconnect()
    nobody = BrokerLogin("127.0.0.1", free_port(), "coordinator", "", "job-2")
    with pytest.raises(JobRequestError) as refused, InvitationSender(nobody, timeout_s=5):
        pass
    assert refused.value.reason == "broker_unreachable"
