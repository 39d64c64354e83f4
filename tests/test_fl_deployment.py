"""Real Flower Deployment Engine: a TLS SuperLink with SuperNode auth, SuperNodes with their own EC keys, the
midgate ServerApp and ClientApp, PLAID windows on every device and the PLAID test split as the buyer's
validation set."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
from flower_fixtures import (
    Device,
    Federation,
    plaid_store_windows,
    plaid_windows,
    running_federation,
    split_by_label,
    split_indices_by_label,
)

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import DropReason, RoundCapture
from coordinator.gate.update_check import check_contribution
from edge.federated.spool import pending_files
from edge.federated.supernode import EXIT_NODE_NOT_REGISTERED
from protocol.errors import UpdateMismatchError
from protocol.messages import ContributionBody
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.drift import drift_offsets
from protocol.tasks.models import build_model, model_arrays
from protocol.tasks.spec import get_task
from protocol.tasks.windows import WindowSet, load_window_file, window_fingerprint

pytestmark = pytest.mark.slow


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    with running_federation(tmp_path, front_hold_s=5.0) as fed:  # devices through a fleet front, as under serve
        yield fed


def _start_devices(fed: Federation, count: int, accelerated: bool = False, via_store: bool = False) -> None:
    """`accelerated`: the agent's device configuration (edge.federated.acceleration: ClientApps forked from the
    warm executor); otherwise Flower's default (a fresh ClientApp process per message). `via_store`: each device's
    windows come from replaying its PLAID recordings into its own SampleStore and exporting them, as on a device."""
    train = plaid_windows("train")
    assert train.y is not None
    for i, series in enumerate(split_indices_by_label(train.y, count, seed=1)):
        if via_store:
            windows = plaid_store_windows(fed.root / f"dev{i}" / "store", series)
        else:
            windows = WindowSet(train.x[series], train.y[series], window_fingerprint(train.x[series], train.y[series]))
        fed.add_device(f"dev{i}", windows, accelerated=accelerated)
    for device in fed.devices:
        device.supernode.start()


def _bodies(spool_dir: Path) -> list[ContributionBody]:
    """The contribution bodies the device's ClientApp spooled (no agent takes them here), oldest name first."""
    return [ContributionBody.parse(p.read_bytes()) for p in pending_files(spool_dir, 1000)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _received(device: Device) -> list[str]:
    """The types of the messages a device's SuperNode received, in order (Flower logs `Receiving: <type> message`)."""
    assert device.supernode.log_path is not None
    return re.findall(r"Receiving: (\S+) message", device.supernode.log_path.read_text())


def test_three_round_job_records_match_the_updates_the_strategy_received(federation: Federation) -> None:
    _start_devices(federation, 3, accelerated=True, via_store=True)
    run_id = federation.submit(plaid_windows("test"), **{"num-rounds": 3, "local-epochs": 2, "attribution": True})
    status, outcome = federation.wait_outcome(run_id, timeout=240)
    assert status == "finished:completed"
    assert outcome is not None and outcome.status == "finished" and outcome.drops == []
    assert outcome.rounds_completed == 3
    # One message per device per round: evaluation is centralised, so no federated evaluate message is ever sent.
    assert all(_received(device) == ["train"] * 3 for device in federation.devices)
    print(f"validation accuracy by round: { {r: m['accuracy'] for r, m in outcome.validation.items()} }")
    assert outcome.validation[3]["accuracy"] > outcome.validation[0]["accuracy"]
    # The captured updates reached attribution: every node was valued in every round.
    assert outcome.attribution_skipped == {}
    assert set(outcome.attribution) == {str(d.node_id) for d in federation.devices}
    assert sum(outcome.attribution.values()) > 0

    captures = CaptureDirectory(federation.run_dir(run_id))
    node_ids = {d.node_id for d in federation.devices}
    for server_round in (1, 2, 3):
        capture = captures.load_round(server_round)
        assert {u.node_id for u in capture.updates} == node_ids
        # Attribution on: aggregated with the valuation's fixed weights (1 each), not the reported example counts.
        assert [u.weight for u in capture.updates] == [1] * len(node_ids)
        assert all(u.examples_reported > 1 for u in capture.updates)
    for device in federation.devices:
        records = _bodies(device.spool_dir)
        assert [r.round for r in records] == [1, 2, 3]
        fingerprint = load_window_file(device.supernode.data_path, get_task("plaid-appliance", 1)).fingerprint
        assert fingerprint.startswith("merkle-sha256:")  # the sample store's dataset fingerprint
        for record in records:
            assert record.dataset_fingerprint == fingerprint.removeprefix("merkle-sha256:")  # bare hex in the report
            assert record.node_id == device.node_id and record.run_id == run_id
            update = check_contribution(record, captures.load_round(record.round))
            assert record.examples == update.examples_reported
            assert record.loss_after < record.loss_before
        # Each round's global model is the previous round's aggregate: the chain of hashes must link up.
        assert len({r.global_model_sha256 for r in records}) == 3

    # Between rounds the devices' pulls found nothing at first and were held by the front until their next message.
    assert federation.front is not None
    federation.front.stop()
    stats = federation.front.stats()
    assert stats.get("held_pulls_answered", 0) >= 2, stats
    assert "held_pulls_refused" not in stats and "upstream_error" not in stats, stats

    forged = records[0].model_copy(update={"update_sha256": records[1].update_sha256})
    with pytest.raises(UpdateMismatchError) as err:
        check_contribution(forged, captures.load_round(forged.round))
    assert err.value.details["found"] == records[1].update_sha256
    assert err.value.details["expected"] == records[0].update_sha256


def test_supernode_killed_mid_round_is_dropped_and_the_job_completes(federation: Federation) -> None:
    _start_devices(federation, 3, accelerated=True)
    victim = federation.devices[2]
    run_id = federation.submit(plaid_windows("test"), **{"num-rounds": 3, "min-nodes": 2, "round-timeout": 20.0})
    log = victim.supernode.log_path
    assert log is not None
    _wait_for(lambda: log.read_text().count("Received successfully") >= 2, 120, "the victim to receive round 2")
    killed = victim.supernode.kill()
    # launchers, warm executor, SuperNode, SuperExec (+ ClientApp): all gone
    assert len(killed) >= 5 and not [pid for pid in killed if _alive(pid)]

    status, outcome = federation.wait_outcome(run_id, timeout=240)
    assert status == "finished:completed"
    assert outcome is not None and outcome.status == "finished" and outcome.rounds_completed == 3
    drops = {(d.round, d.node_id): d.reason for d in outcome.drops}
    assert drops[(2, victim.node_id)] in (DropReason.NO_REPLY, DropReason.NODE_UNAVAILABLE)
    assert drops[(3, victim.node_id)] == DropReason.DROPPED_EARLIER
    captures = CaptureDirectory(federation.run_dir(run_id))
    assert victim.node_id not in {u.node_id for u in captures.load_round(2).updates}
    assert len(captures.load_round(3).updates) == 2


def test_job_fails_cleanly_with_a_reason_when_too_few_nodes_remain(federation: Federation) -> None:
    _start_devices(federation, 3)
    victim = federation.devices[2]
    run_id = federation.submit(plaid_windows("test"), **{"num-rounds": 3, "min-nodes": 3, "round-timeout": 15.0})
    log = victim.supernode.log_path
    assert log is not None
    _wait_for(lambda: log.read_text().count("Received successfully") >= 1, 120, "the victim to receive round 1")
    victim.supernode.kill()
    status, outcome = federation.wait_outcome(run_id, timeout=180)
    assert status == "finished:failed"
    assert outcome is not None and outcome.status == "failed" and outcome.reason == "too_few_replies"
    assert outcome.rounds_completed == 0
    assert any(d.node_id == victim.node_id and d.round == 1 for d in outcome.drops)


def test_device_with_an_unregistered_key_cannot_join(federation: Federation) -> None:
    stranger = federation.add_device("stranger", split_by_label(plaid_windows("train"), 3)[0], register=False)
    stranger.supernode.start()
    assert stranger.supernode.wait_exit(timeout=60) not in (None, 0)
    assert stranger.supernode.flower_exit_code() == EXIT_NODE_NOT_REGISTERED
    assert _bodies(stranger.spool_dir) == []


def test_dp_job_clips_updates_on_devices_and_reports_privacy_spent(federation: Federation) -> None:
    _start_devices(federation, 3, accelerated=True)
    clip = 0.05
    run_id = federation.submit(
        plaid_windows("test"), **{"num-rounds": 2, "dp-clipping-norm": clip, "dp-noise-multiplier": 0.8}
    )
    status, outcome = federation.wait_outcome(run_id, timeout=240)
    assert status == "finished:completed"
    assert outcome is not None and outcome.status == "finished"
    assert 0 < outcome.privacy["epsilon"] < float("inf") and outcome.privacy["releases"] == 2
    spec = get_task("plaid-appliance", 1)
    initial = model_arrays(build_model(spec, seed=0))
    captures = CaptureDirectory(federation.run_dir(run_id))
    for update in captures.load_round(1).updates:
        norm = np.sqrt(sum(float(np.sum((update.arrays[k] - initial[k]) ** 2)) for k in initial))
        assert norm <= clip * (1 + 1e-4)  # fixedclipping_mod ran on the device before the update was sent
    for device in federation.devices:
        for record in _bodies(device.spool_dir):
            assert record.dp is not None and record.dp.clipping_norm == clip
            check_contribution(record, captures.load_round(record.round))  # hashed after clipping


def _recomputed_offsets(capture: RoundCapture) -> dict[int, str]:
    """Node id -> hash of the offset the strategy should have sent, from the captured gradients and weights."""
    gradients = {u.node_id: u.gradient for u in capture.updates if u.gradient is not None}
    weights = {u.node_id: u.weight for u in capture.updates}
    return {node: arrays_sha256(o) for node, o in drift_offsets(gradients, weights, 1.0).items()}  # type: ignore[arg-type]


def test_drift_corrected_job_records_match_the_captured_updates_gradients_and_offsets(federation: Federation) -> None:
    _start_devices(federation, 3, accelerated=True)
    run_id = federation.submit(
        plaid_windows("test"),
        **{"num-rounds": 3, "drift-correction": 1.0, "local-epochs": 1, "batch-size": 8, "server-momentum": 0.5},
    )
    status, outcome = federation.wait_outcome(run_id, timeout=300)
    assert status == "finished:completed"
    assert outcome is not None and outcome.status == "finished" and outcome.drops == []
    assert outcome.validation[3]["accuracy"] > outcome.validation[0]["accuracy"]
    # Two messages a round to every device: the gradient query, then training.
    assert all(_received(device) == ["query.gradient", "train"] * 3 for device in federation.devices)
    captures = CaptureDirectory(federation.run_dir(run_id))
    node_ids = {d.node_id for d in federation.devices}
    for server_round in (1, 2, 3):
        capture = captures.load_round(server_round)
        assert {u.node_id for u in capture.updates} == node_ids
        assert all(u.gradient is not None and u.drift_offset_sha256 is not None for u in capture.updates)
        # Weighted by examples here, the offsets the nodes trained with are the ones the captured gradients give.
        assert [u.weight for u in capture.updates] == [u.examples_reported for u in capture.updates]
        assert _recomputed_offsets(capture) == {u.node_id: u.drift_offset_sha256 for u in capture.updates}
    for device in federation.devices:
        records = _bodies(device.spool_dir)
        assert [r.round for r in records] == [1, 2, 3]
        for record in records:
            assert record.gradient_sha256 is not None and record.drift_offset_sha256 is not None
            check_contribution(record, captures.load_round(record.round))
    forged = records[1].model_copy(update={"gradient_sha256": records[2].gradient_sha256})
    with pytest.raises(UpdateMismatchError) as err:
        check_contribution(forged, captures.load_round(forged.round))
    assert err.value.details["expected"] == records[1].gradient_sha256


def test_drift_corrected_node_failing_its_gradient_query_is_not_sent_training(federation: Federation) -> None:
    _start_devices(federation, 3, accelerated=True)
    victim = federation.devices[2]
    victim.supernode.data_path.unlink()  # its ClientApp cannot answer the gradient query: an error reply
    run_id = federation.submit(
        plaid_windows("test"), **{"num-rounds": 2, "drift-correction": 1.0, "min-nodes": 2, "round-timeout": 60.0}
    )
    status, outcome = federation.wait_outcome(run_id, timeout=300)
    assert status == "finished:completed"
    assert outcome is not None and outcome.status == "finished" and outcome.rounds_completed == 2
    drops = {(d.round, d.node_id): d for d in outcome.drops}
    assert set(drops) == {(1, victim.node_id), (2, victim.node_id)}  # asked again: an error reply is not a death
    assert all(d.reason == DropReason.ERROR_REPLY and d.detail.startswith("gradient query") for d in drops.values())
    captures = CaptureDirectory(federation.run_dir(run_id))
    for server_round in (1, 2):
        capture = captures.load_round(server_round)
        assert {u.node_id for u in capture.updates} == {d.node_id for d in federation.devices[:2]}
        assert [d.node_id for d in capture.drops] == [victim.node_id]
    assert _bodies(victim.spool_dir) == []


def test_drift_corrected_node_silent_in_the_gradient_query_is_dropped_for_the_job(federation: Federation) -> None:
    _start_devices(federation, 3, accelerated=True)
    victim = federation.devices[2]
    run_id = federation.submit(
        plaid_windows("test"), **{"num-rounds": 3, "drift-correction": 1.0, "min-nodes": 2, "round-timeout": 30.0}
    )
    round_one = federation.run_dir(run_id) / "round-000001.json"
    # The round-1 capture is written after the victim's round-1 update arrived and before round 2's query is sent;
    # the victim cannot pull, compute and answer that query (>= 0.5 s of SuperNode polls) before this kill lands.
    _wait_for(round_one.exists, 180, "round 1's capture")
    victim.supernode.kill()
    status, outcome = federation.wait_outcome(run_id, timeout=240)
    assert status == "finished:completed"
    assert outcome is not None and outcome.status == "finished" and outcome.rounds_completed == 3
    drops = {(d.round, d.node_id): d for d in outcome.drops}
    assert drops[(2, victim.node_id)].reason in (DropReason.NO_REPLY, DropReason.NODE_UNAVAILABLE)
    assert drops[(2, victim.node_id)].detail.startswith("gradient query")
    assert drops[(3, victim.node_id)].reason == DropReason.DROPPED_EARLIER
    captures = CaptureDirectory(federation.run_dir(run_id))
    assert victim.node_id not in {u.node_id for u in captures.load_round(2).updates}
    assert len(captures.load_round(3).updates) == 2


def test_dp_job_asking_for_drift_correction_is_refused_with_a_reason(federation: Federation) -> None:
    run_id = federation.submit(
        plaid_windows("test"),
        **{"num-rounds": 1, "drift-correction": 1.0, "dp-clipping-norm": 0.1, "selected-nodes": "1 2"},
    )
    status, outcome = federation.wait_outcome(run_id, timeout=120)
    assert status == "finished:failed"
    assert outcome is not None and outcome.status == "failed" and outcome.reason == "invalid_run_config"
    assert "drift-correction cannot be combined with DP" in outcome.detail
    assert not list(federation.run_dir(run_id).glob("round-*"))  # refused before any message was sent
