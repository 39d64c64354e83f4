"""The policy in force now, for a command that reads the log beside `serve`: the latest POLICY leaf, or, before
`serve` logged any, the configured policy (version 0)."""

from __future__ import annotations

from coordinator.config import CoordinatorSettings
from coordinator.ledger.store import LedgerReader
from coordinator.policy.document import MidPolicy, configured_policy
from coordinator.policy.ledger_records import current_policy


def policy_in_force(settings: CoordinatorSettings) -> tuple[MidPolicy, int]:
    """(policy, version): what a quote or a job request made now is checked against."""
    if settings.ledger_path.exists():
        with LedgerReader.open_existing(settings.ledger_path) as reader:
            logged = current_policy(reader)
        if logged is not None:
            return logged.policy, logged.version
    return configured_policy(settings), 0
