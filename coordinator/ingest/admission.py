"""What ingest asks of the contribution gate (coordinator/gate/), so that ingest never imports it.

The composition root hands the gate to the ingest service when `[federation] enabled`; without it every verified,
deduplicated report goes straight to the ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from coordinator.ingest.pipeline import Candidate, Verdict


@dataclass
class Admission:
    """What the gate made of a batch's candidates, or of the reports that were waiting."""

    ready: list[Candidate] = field(default_factory=list)
    """Cross-checked (or no contribution at all): on to the ledger commit."""
    held: list[Verdict] = field(default_factory=list)
    """Stored durably to wait for their round's capture: acknowledge to the broker, no receipt yet."""
    refused: list[Verdict] = field(default_factory=list)
    """Refused for good (stored), each owed the Refusal notice in `notices`."""
    notices: list[tuple[str, bytes]] = field(default_factory=list)


class ContributionAdmission(Protocol):
    """The contribution gate as ingest drives it: one call at a time, on the thread that appends to the ledger."""

    def admit(self, candidates: Sequence[Candidate], now_ms: int) -> Admission:
        """Cross-check a batch's candidates; contribution reports without their round's capture are held."""
        ...

    def due(self, now_monotonic: float) -> bool:
        """Whether waiting reports should be re-checked now."""
        ...

    def resolve(self, now_ms: int) -> Admission:
        """Re-check waiting reports: `ready` once their capture appeared, `refused` when it contradicts them or
        they waited past the grace period."""
        ...

    def logged(self, verdicts: Sequence[Verdict]) -> None:
        """The `ready` reports of a `resolve` that are now in the ledger: stop holding them."""
        ...

    def close(self) -> None: ...
