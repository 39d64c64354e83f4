"""One exception hierarchy for every rejection in the protocol, each with a stable reason code.

Services count and log rejections by `reason`; the codes are part of the wire contract (docs/protocol.md) and never
change meaning. Each error carries the offending values as keyword details, as transparency-dev/merkle's typed
errors do, so a log line says what was expected and what was found.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Stable reason codes. Append new ones; never rename or reuse one."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    WRONG_TYPE = "wrong_type"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    REVOKED_KEY = "revoked_key"
    REPLAYED = "replayed"
    EQUIVOCATION = "equivocation"
    BAD_TOPIC = "bad_topic"
    TOPIC_MISMATCH = "topic_mismatch"
    RATE_LIMITED = "rate_limited"
    BAD_KEY = "bad_key"
    INSECURE_KEY_FILE = "insecure_key_file"
    BAD_NOTE = "bad_note"
    BAD_PROOF = "bad_proof"
    ROOT_MISMATCH = "root_mismatch"
    INCONSISTENT = "inconsistent"
    STALE_CHECKPOINT = "stale_checkpoint"
    INVITE_EXPIRED = "invite_expired"
    INVITE_USED = "invite_used"
    INVITE_INVALID = "invite_invalid"
    UPDATE_MISMATCH = "update_mismatch"
    POLICY_VIOLATION = "policy_violation"
    SENSOR_UNAVAILABLE = "sensor_unavailable"
    SENSOR_IO = "sensor_io"
    SETTLEMENT_MISMATCH = "settlement_mismatch"
    QUORUM_NOT_MET = "quorum_not_met"
    ROUND_NOT_CAPTURED = "round_not_captured"
    UPDATE_DROPPED = "update_dropped"
    WRONG_ROUND_NONCE = "wrong_round_nonce"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_TASK = "unknown_task"
    STALE_REQUEST = "stale_request"
    BAD_LOGIN = "bad_login"
    UNSIGNED = "unsigned"
    UNKNOWN_JOB = "unknown_job"
    JOB_STATE = "job_state"
    IDEMPOTENCY_MISMATCH = "idempotency_mismatch"
    MODEL_MISMATCH = "model_mismatch"
    MANIFEST_MISMATCH = "manifest_mismatch"
    STRIKE = "strike"
    CSRF = "csrf"


class ReasonedError(Exception):
    """A refusal with a stable `reason` code (a class's own, or given per instance) and `details` naming the
    offending values; said as `reason: message (key=value, ...)`."""

    reason: StrEnum

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        if not self.details:
            return f"{self.reason}: {self.message}"
        shown = ", ".join(f"{k}={v!r}" for k, v in self.details.items())
        return f"{self.reason}: {self.message} ({shown})"


class ProtocolError(ReasonedError):
    """Base of every protocol rejection. `reason` is stable; `details` name the offending values."""

    reason: Reason = Reason.MALFORMED


class TooLargeError(ProtocolError):
    """The input exceeds a size limit; checked before any parsing."""

    reason = Reason.TOO_LARGE


class MalformedError(ProtocolError):
    """The input is not well-formed (encoding, JSON, schema, lengths)."""

    reason = Reason.MALFORMED


class WrongTypeError(ProtocolError):
    """A verified payload has a payloadType other than the one expected here."""

    reason = Reason.WRONG_TYPE


class BadSignatureError(ProtocolError):
    """No signature by a trusted key verifies over the exact bytes."""

    reason = Reason.BAD_SIGNATURE


class UnknownKeyError(ProtocolError):
    """The signer's key id is not among the trusted keys."""

    reason = Reason.UNKNOWN_KEY


class RevokedKeyError(ProtocolError):
    """The signer's key was revoked."""

    reason = Reason.REVOKED_KEY


class ReplayedError(ProtocolError):
    """A seq or nonce that was already used."""

    reason = Reason.REPLAYED


class EquivocationError(ProtocolError):
    """Two different signed statements for the same slot (same key and seq, or same tree size)."""

    reason = Reason.EQUIVOCATION


class BadTopicError(ProtocolError):
    """A topic or id outside the topic grammar or its safe alphabet."""

    reason = Reason.BAD_TOPIC


class TopicMismatchError(ProtocolError):
    """A message arrived on a topic that does not belong to its signer."""

    reason = Reason.TOPIC_MISMATCH


class RateLimitedError(ProtocolError):
    """A device exceeded its rate limit."""

    reason = Reason.RATE_LIMITED


class BadKeyError(ProtocolError):
    """A key encoding (verifier key, signer key) is not valid."""

    reason = Reason.BAD_KEY


class InsecureKeyFileError(ProtocolError):
    """A private key file is readable or writable by others than its owner."""

    reason = Reason.INSECURE_KEY_FILE


class BadNoteError(ProtocolError):
    """A C2SP signed note is not well-formed."""

    reason = Reason.BAD_NOTE


class BadProofError(ProtocolError):
    """A Merkle proof has the wrong shape for the sizes it claims."""

    reason = Reason.BAD_PROOF


class RootMismatchError(ProtocolError):
    """A proof computed a root other than the expected one."""

    reason = Reason.ROOT_MISMATCH


class InconsistentError(ProtocolError):
    """Two checkpoints that cannot both be views of one append-only log."""

    reason = Reason.INCONSISTENT


class StaleCheckpointError(ProtocolError):
    """A checkpoint smaller than the one already trusted."""

    reason = Reason.STALE_CHECKPOINT


class InviteExpiredError(ProtocolError):
    reason = Reason.INVITE_EXPIRED


class InviteUsedError(ProtocolError):
    reason = Reason.INVITE_USED


class InviteInvalidError(ProtocolError):
    reason = Reason.INVITE_INVALID


class UpdateMismatchError(ProtocolError):
    """A contribution report names an update hash other than the update the coordinator received."""

    reason = Reason.UPDATE_MISMATCH


class PolicyViolationError(ProtocolError):
    """A configuration or request breaks MID policy (e.g. fee above the cap)."""

    reason = Reason.POLICY_VIOLATION


class SettlementMismatchError(ProtocolError):
    """A settlement or royalty record whose stored outputs differ from what its own inputs compute."""

    reason = Reason.SETTLEMENT_MISMATCH


class QuorumNotMetError(ProtocolError):
    """A checkpoint lacks the required number of valid witness cosignatures."""

    reason = Reason.QUORUM_NOT_MET


class RoundNotCapturedError(ProtocolError):
    """A contribution report for a run and round the MID holds no capture of, after the grace period: the round never
    completed (or never existed). Not evidence of lying: the report is refused, the device is not flagged."""

    reason = Reason.ROUND_NOT_CAPTURED


class UpdateDroppedError(ProtocolError):
    """A contribution report for a round whose capture lists the node as dropped (late, lost, error or malformed
    reply): its update was not aggregated, so it is no contribution. Refused, not flagged."""

    reason = Reason.UPDATE_DROPPED


class WrongRoundNonceError(ProtocolError):
    """A contribution report whose `round_nonce` is not the nonce the MID's invitation to the run's job gave the
    signing device (another device's, another job's, one never issued, or a run of no job the MID started). Refused,
    not flagged: an honest agent maps run ids to nonces only from invitations that named the run (edge/agent/job_node.py
    `nonce_for`), so a record of a job that ended before any did, still spooled when a new job starts, gets the new
    job's nonce."""

    reason = Reason.WRONG_ROUND_NONCE


class UnknownModelError(ProtocolError):
    """A revenue report (or a royalty recorded by hand) names a model version the MID has no settlement for: a model
    it never trained, a typo, or a job not settled yet. Nothing is logged; the report may be sent again once the job's
    settlement is in the ledger."""

    reason = Reason.UNKNOWN_MODEL


class StaleRequestError(ProtocolError):
    """A signed request (a member's statement request) whose `issued_ms` lies outside the coordinator's window: a
    replay of an old request, or a device clock far off. Requests carry a nonce and a time instead of a seq, so a
    nonce is remembered only for as long as its request could be accepted."""

    reason = Reason.STALE_REQUEST


class UnsignedError(ProtocolError):
    """A buyer API request without the signature headers it needs (docs/protocol.md, "Buyer request signatures")."""

    reason = Reason.UNSIGNED


class UnknownJobError(ProtocolError):
    """A job id the MID does not hold for this buyer: never requested, or another buyer's (not told apart)."""

    reason = Reason.UNKNOWN_JOB


class JobStateError(ProtocolError):
    """A step a job cannot take in its state (accept before a quote, download before delivery, ...)."""

    reason = Reason.JOB_STATE


class IdempotencyMismatchError(ProtocolError):
    """An Idempotency-Key the buyer used before for another request body."""

    reason = Reason.IDEMPOTENCY_MISMATCH


class ModelMismatchError(ProtocolError):
    """A model file whose SHA-256 is not the one its provenance manifest names: another model, or altered bytes."""

    reason = Reason.MODEL_MISMATCH


class ManifestMismatchError(ProtocolError):
    """A provenance manifest field that contradicts the ledger leaf it cites (job, model version, members, rounds,
    task, purpose), or a leaf of another kind than the manifest says."""

    reason = Reason.MANIFEST_MISMATCH


class StrikeInForceError(ProtocolError):
    """A job (or a quote for one) whose buyer and purpose a members' strike in force covers: at least the MID's
    strike quorum of its active members strike against it (coordinator/registry/strikes.py)."""

    reason = Reason.STRIKE
