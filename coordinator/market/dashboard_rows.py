"""The buyer market's jobs as the operator dashboard's jobs page lists them. Here, not in the dashboard, because the
market sits above the dashboard in the layers: `serve` hands the dashboard this reader (coordinator/serve/assembly.py).
"""

from __future__ import annotations

from coordinator.dashboard.pages import BuyerJobRow
from coordinator.market.models import MarketJob
from coordinator.market.store import MarketStore


def buyer_job_rows(store: MarketStore) -> list[BuyerJobRow]:
    """Every buyer job in market.sqlite, newest first: state, buyer, quoted total and escrow leaf (blocking)."""
    rows = []
    for job_id in store.job_ids():
        found = store.job_doc(job_id)
        if found is None:
            continue
        job = MarketJob.model_validate_json(found[1])
        escrow = job.ledger.escrow if job.ledger.escrow is not None else (job.escrow.index if job.escrow else None)
        rows.append(
            BuyerJobRow(
                job_id=job.job_id,
                buyer=job.buyer,
                state=job.state,
                reason=job.reason,
                task=job.request.task,
                total_minor=None if job.quote is None else job.quote.total_minor,
                currency=None if job.quote is None else job.quote.currency,
                escrow_index=escrow,
                created_ms=job.created_ms,
            )
        )
    return sorted(rows, key=lambda r: (-r.created_ms, r.job_id))
