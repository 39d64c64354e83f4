"""The coordinator's cross-check of a device's contribution report against the update Flower delivered.

Called after the report's signature verified and its bytes parsed: the report must name the run, round and node of
an update the strategy captured, and the same global-model and update hashes (and, in drift-corrected jobs, the
gradient and offset hashes; null in other jobs); otherwise it is refused with `update_mismatch` and nothing is
recorded. A signed report must also carry the nonce of the invitation the MID sent its signer for the run's job
(`check_round_nonce`); otherwise it is refused `wrong_round_nonce`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from coordinator.capture.round import CapturedUpdate, RoundCapture
from protocol.errors import UpdateMismatchError, WrongRoundNonceError
from protocol.messages import ContributionBody


def find_update(record: ContributionBody, capture: RoundCapture) -> CapturedUpdate:
    """The captured update the report speaks of; raises UpdateMismatchError if the strategy received none."""
    if record.run_id != capture.run_id or record.round != capture.round:
        raise UpdateMismatchError(
            "report names another run or round",
            expected=(capture.run_id, capture.round),
            found=(record.run_id, record.round),
        )
    for update in capture.updates:
        if update.node_id == record.node_id:
            return update
    raise UpdateMismatchError("no update from this node in this round", node_id=record.node_id, round=record.round)


def check_contribution(record: ContributionBody, capture: RoundCapture) -> CapturedUpdate:
    """The matching captured update if the report's hashes are exactly those of what Flower delivered (a signed
    ContributionReport is a ContributionBody, and so is what the ClientApp spooled)."""
    update = find_update(record, capture)
    if record.global_model_sha256 != update.global_sha256:
        raise UpdateMismatchError(
            "report names another global model",
            node_id=record.node_id,
            expected=update.global_sha256,
            found=record.global_model_sha256,
        )
    if record.update_sha256 != update.update_sha256:
        raise UpdateMismatchError(
            "report names another update",
            node_id=record.node_id,
            expected=update.update_sha256,
            found=record.update_sha256,
        )
    _check_drift_hashes(record, update)
    return update


def _check_drift_hashes(record: ContributionBody, update: CapturedUpdate) -> None:
    """Drift-corrected jobs (protocol.tasks.drift): a report also names the gradient the node returned to the round's
    query and the offset it trained with; both must be what the strategy captured, null when the job has no drift
    correction. So null hashes for a drift-corrected round are a mismatch, not a pass, or a device could keep its
    gradient and offset out of the check by leaving them out."""
    for field, found, expected in (
        ("gradient", record.gradient_sha256, update.gradient_sha256),
        ("drift offset", record.drift_offset_sha256, update.drift_offset_sha256),
    ):
        if found != expected:
            raise UpdateMismatchError(
                f"report names another {field}", node_id=record.node_id, expected=expected, found=found
            )


def check_round_nonce(device: str, run_id: int, round_nonce: str, issued: Mapping[str, str] | None) -> None:
    """Raise WrongRoundNonceError unless `round_nonce` is the nonce the MID's invitation to `run_id`'s job gave the
    signing `device` (`job start` draws one per invited device: JobRecord.nonces).

    Parameters
    ----------
    device: the device whose key signed the report (screening established it).
    run_id, round_nonce: what the report states.
    issued: device id -> nonce, of the job record that names `run_id` (coordinator.gate.issued_nonces);
        None: no job record names the run, so the MID issued no nonce for it.

    Compared in constant time (the nonce is the device's proof of its invitation); the error names the run and the
    device, never a nonce: its detail goes to the logs and, in the Refusal notice, to the device.
    """
    if issued is None:
        raise WrongRoundNonceError("no job of this MID names the run, so it issued no nonce for it", run_id=run_id)
    expected = issued.get(device)
    if expected is None:
        raise WrongRoundNonceError("the run's job did not invite the signing device", run_id=run_id, device=device)
    found = round_nonce.encode()
    if hmac.compare_digest(found, expected.encode()):
        return
    if any(hmac.compare_digest(found, nonce.encode()) for other, nonce in issued.items() if other != device):
        raise WrongRoundNonceError(
            "report carries the nonce of another device's invitation", run_id=run_id, device=device
        )
    raise WrongRoundNonceError(
        "report carries a nonce the MID did not issue to its device for this run", run_id=run_id, device=device
    )
