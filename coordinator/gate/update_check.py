"""The coordinator's cross-check of a device's contribution report against the update Flower delivered.

Called after the report's signature verified and its bytes parsed (protocol.tasks.parse_contribution_record): the
report must name the run, round and node of an update the strategy captured, and the same global-model and update
hashes (and, in drift-corrected jobs, gradient and offset hashes, which only ContributionReportV2 carries); otherwise
it is refused with `update_mismatch` and nothing is recorded. A signed report must also carry the nonce of the
invitation the MID sent its signer for the run's job (`check_round_nonce`); otherwise it is refused
`wrong_round_nonce`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Protocol

from coordinator.capture.round import CapturedUpdate, RoundCapture
from protocol.errors import UpdateMismatchError, WrongRoundNonceError


class ReportedUpdate(Protocol):
    """What a report says about one node's update: the ClientApp's ContributionRecord and the wire protocol's signed
    ContributionReport both carry these fields."""

    @property
    def run_id(self) -> int: ...
    @property
    def round(self) -> int: ...
    @property
    def node_id(self) -> int: ...
    @property
    def global_model_sha256(self) -> str: ...
    @property
    def update_sha256(self) -> str: ...


def find_update(record: ReportedUpdate, capture: RoundCapture) -> CapturedUpdate:
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


def check_contribution(record: ReportedUpdate, capture: RoundCapture) -> CapturedUpdate:
    """The matching captured update if the report's hashes are exactly those of what Flower delivered."""
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


def _check_drift_hashes(record: ReportedUpdate, update: CapturedUpdate) -> None:
    """Drift-corrected jobs (protocol.tasks.drift): a record (ClientApp's, or the wire ContributionReportV2) also
    names the gradient the node returned to the round's query and the offset it trained with; both must be what the
    strategy captured (None when the job has no drift correction). A report whose schema has no such fields (the wire
    ContributionReport v1) says "no drift correction": for a drift-corrected round it is a mismatch, not a pass,
    or a device could keep its gradient and offset out of the check by signing the older version."""
    for field, expected in (
        ("gradient_sha256", update.gradient_sha256),
        ("drift_offset_sha256", update.drift_offset_sha256),
    ):
        found = getattr(record, field, None)
        if found != expected:
            raise UpdateMismatchError(
                f"report names another {field.removesuffix('_sha256').replace('_', ' ')}",
                node_id=record.node_id,
                expected=expected,
                found=found,
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
