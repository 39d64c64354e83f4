"""coordinator.gate.update_check: a device's report is accepted only for the exact update Flower delivered;
CaptureDirectory re-hashes stored updates, so a tampered capture shows as a mismatch too. Its nonce must be the one
the MID's invitation to the run's job gave the signing device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mqtt_fixtures import contribution_body

from coordinator.capture.directory import CaptureDirectory
from coordinator.capture.round import CapturedUpdate, DropReason, NodeDrop, RoundCapture
from coordinator.gate.update_check import check_contribution, check_round_nonce
from protocol.errors import Reason, UpdateMismatchError, WrongRoundNonceError
from protocol.messages import ContributionBody
from protocol.tasks.arrays import arrays_sha256

RUN, ROUND = 77, 2


def _capture(tmp_path: Path) -> tuple[CaptureDirectory, dict[int, dict[str, np.ndarray]], str]:
    rng = np.random.default_rng(0)
    global_arrays = {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    global_sha = arrays_sha256(global_arrays)
    updates = {n: {k: v + n for k, v in global_arrays.items()} for n in (11, 12)}
    directory = CaptureDirectory(tmp_path / "run")
    directory.on_round(
        RoundCapture(
            RUN,
            ROUND,
            global_sha,
            tuple(
                CapturedUpdate(ROUND, n, a, arrays_sha256(a), global_sha, 50, 50, {"loss-after": 1.0})
                for n, a in updates.items()
            ),
            (NodeDrop(ROUND, 13, DropReason.NO_REPLY),),
        )
    )
    return directory, updates, global_sha


def _report(node: int, arrays: dict[str, np.ndarray], global_sha: str, **changes: object) -> ContributionBody:
    fields: dict[str, object] = {
        "run_id": RUN,
        "round": ROUND,
        "node_id": node,
        "task_id": "plaid-appliance",
        "global_model_sha256": global_sha,
        "update_sha256": arrays_sha256(arrays),
    }
    return contribution_body(0, **{**fields, **changes})


def test_matching_report_is_accepted(tmp_path: Path) -> None:
    directory, updates, global_sha = _capture(tmp_path)
    capture = directory.load_round(ROUND)
    update = check_contribution(_report(12, updates[12], global_sha), capture)
    assert update.node_id == 12 and update.update_sha256 == arrays_sha256(updates[12])
    assert {d.node_id: d.reason for d in capture.drops} == {13: DropReason.NO_REPLY}


@pytest.mark.parametrize(
    "changes",
    [
        {"update_sha256": "f" * 64},  # names another update
        {"global_model_sha256": "e" * 64},  # trained from another global model
        {"node_id": 13},  # a node whose update never arrived
        {"round": ROUND + 1},  # another round
        {"run_id": RUN + 1},  # another run
    ],
)
def test_report_naming_anything_else_is_refused(tmp_path: Path, changes: dict[str, object]) -> None:
    directory, updates, global_sha = _capture(tmp_path)
    with pytest.raises(UpdateMismatchError) as err:
        check_contribution(_report(11, updates[11], global_sha, **changes), directory.load_round(ROUND))
    assert err.value.reason is Reason.UPDATE_MISMATCH


def test_another_nodes_update_hash_is_refused(tmp_path: Path) -> None:
    directory, updates, global_sha = _capture(tmp_path)
    with pytest.raises(UpdateMismatchError) as err:
        check_contribution(_report(11, updates[12], global_sha), directory.load_round(ROUND))
    assert err.value.details == {
        "node_id": 11,
        "expected": arrays_sha256(updates[11]),
        "found": arrays_sha256(updates[12]),
    }


def test_tampered_capture_no_longer_matches_the_honest_report(tmp_path: Path) -> None:
    directory, updates, global_sha = _capture(tmp_path)
    tampered = {k: v.copy() for k, v in updates[11].items()}
    tampered["b"][0] += 1
    np.savez(tmp_path / "run" / f"round-{ROUND:06d}-node-11.npz", **tampered)
    with pytest.raises(UpdateMismatchError):
        check_contribution(_report(11, updates[11], global_sha), directory.load_round(ROUND))


ISSUED = {"d-one": "a1" * 16, "d-two": "b2" * 16}


@pytest.mark.parametrize(
    ("device", "nonce", "issued", "why"),
    [
        ("d-one", "a1" * 16, ISSUED, None),
        ("d-one", "a1" * 15 + "a0", ISSUED, "did not issue"),  # one nibble off
        ("d-one", "A1" * 16, ISSUED, "did not issue"),  # nonces are lowercase hex: compared as bytes
        ("d-one", "b2" * 16, ISSUED, "another device's invitation"),
        ("d-three", "a1" * 16, ISSUED, "did not invite"),
        ("d-one", "a1" * 16, {}, "did not invite"),
        ("d-one", "a1" * 16, None, "no job"),
        ("d-one", "é" * 32, ISSUED, "did not issue"),  # never raises anything but the refusal
    ],
    ids=["issued", "other-nonce", "upper-case", "other-device", "not-invited", "no-devices", "no-job", "non-ascii"],
)
def test_round_nonce_must_be_the_one_issued_to_the_signing_device(
    device: str, nonce: str, issued: dict[str, str] | None, why: str | None
) -> None:
    if why is None:
        check_round_nonce(device, RUN, nonce, issued)
        return
    with pytest.raises(WrongRoundNonceError) as err:
        check_round_nonce(device, RUN, nonce, issued)
    assert err.value.reason is Reason.WRONG_ROUND_NONCE and why in err.value.message
    assert err.value.details["run_id"] == RUN
    assert not any(n in str(err.value) for n in ISSUED.values()) and nonce not in str(err.value)
