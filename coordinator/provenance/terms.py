"""The purpose and licence terms a job's model is delivered under: the MID policy version the job ran under."""

from __future__ import annotations

from coordinator.config import CoordinatorSettings
from coordinator.ledger.store import LedgerReader
from coordinator.policy.document import configured_policy
from coordinator.policy.ledger_records import iter_policies, policy_at
from protocol.errors import PolicyViolationError
from protocol.provenance import PurposeTerms

UNLISTED_LICENCE = "none: the purpose is not in the MID's purpose vocabulary; no use is licensed beyond the purpose"


def purpose_terms(settings: CoordinatorSettings, reader: LedgerReader, code: str, started_ms: int) -> PurposeTerms:
    """The terms of `code` in the policy version in force when the job started (policy_at); a job older than every
    POLICY leaf takes the first one, and a log without any takes the configured policy (version 0). A purpose the
    vocabulary lacks (a `job start` does not check it yet) gets terms that say so, never invented ones."""
    logged = policy_at(reader, started_ms) or next(iter_policies(reader), None)
    policy, version = (logged.policy, logged.version) if logged is not None else (configured_policy(settings), 0)
    try:
        purpose = policy.purpose(code)
    except PolicyViolationError:
        return PurposeTerms(code=code, dpv="", licence=UNLISTED_LICENCE, policy_version=version)
    return PurposeTerms(code=code, dpv=purpose.dpv, licence=purpose.licence, policy_version=version)
