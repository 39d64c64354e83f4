"""Registry facts the ledger must record: enrolments (the device's signed EnrolmentRequest) and key revocations
(a MID-signed KeyRevocation).

Registry and ledger are two SQLite files without a shared transaction, so the registry keeps each fact as owed
(`ledger_records` with no leaf index) in the same transaction that creates it, and the ledger's one writer --
`coordinator serve` -- appends what is owed: an enrolment right after redeeming the invite, a revocation before the
next ingest batch, and anything a crash left behind when it starts. A crash between the ledger append and marking
the record logged appends the record again at the next start: a fact may be logged twice, never lost.
"""

from __future__ import annotations

from coordinator.ledger.store import LedgerStore
from coordinator.registry.store import Registry
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind
from protocol.messages import KeyRevocation


def log_revocations(registry: Registry, ledger: LedgerStore, mid_key: SignerKey, mid: str) -> list[int]:
    """Append a signed KeyRevocation for every revocation not yet logged; returns their leaf indices."""
    owed = registry.unlogged("revoke")
    if not owed:
        return []
    leaves = []
    for device, _ in owed:
        assert device.revoked_ms is not None
        revocation = KeyRevocation(
            mid=mid, device=device.device_id, device_key=device.verifier.text(), revoked_ms=device.revoked_ms
        )
        leaves.append(Leaf(LeafKind.KEY_REVOKE, revocation.seal(mid_key)))
    appended = ledger.append_leaves(leaves)
    indices = list(appended.indices)
    registry.mark_logged("revoke", [(device.device_id, i) for (device, _), i in zip(owed, indices, strict=True)])
    return indices


def log_enrolments(registry: Registry, ledger: LedgerStore) -> list[int]:
    """Append the stored EnrolmentRequest of every enrolment not yet logged; returns their leaf indices."""
    owed = [(device, signed) for device, signed in registry.unlogged("enrol") if signed is not None]
    if not owed:
        return []
    appended = ledger.append_leaves([Leaf(LeafKind.ENROL, signed) for _, signed in owed])
    indices = list(appended.indices)
    registry.mark_logged("enrol", [(device.device_id, i) for (device, _), i in zip(owed, indices, strict=True)])
    return indices
