"""The ledger's ESCROW, ESCROW_RELEASE and REFUND leaves: a buyer's payment for a job, held, then settled or returned.

`coordinator serve` appends them as a buyer job moves on (coordinator/market/): ESCROW when the buyer accepts a quote
(the leaf keeps the buyer's own signed authorisation of that call, so the MID cannot invent a payment), then exactly
one of ESCROW_RELEASE (the job was delivered; the same amount went into the job's SETTLEMENT leaf, which it names) or
REFUND (the job failed or was cancelled; the reason). As with JOB leaves, a leaf's body is the record's canonical JSON.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, ValidationError

from protocol.errors import MalformedError, TooLargeError
from protocol.leaves import MAX_SIGNED_SIZE, LeafKind
from protocol.messages import CanonicalModel, Ident, ShortText, TimeMs

EscrowEvent = Literal["deposit", "release", "refund"]
EVENT_KIND: dict[str, LeafKind] = {
    "deposit": LeafKind.ESCROW,
    "release": LeafKind.ESCROW_RELEASE,
    "refund": LeafKind.REFUND,
}


class EscrowRecord(CanonicalModel):
    """One movement of a job's escrow.

    job_id, buyer: the buyer job. amount_minor, currency: the money moved (the quote's total).
    quote_sha256: the hash of the quote the buyer accepted (the canonical JSON the API returned).
    authorisation: (deposit) the buyer's `Midgate-Signature` envelope of the accept request, verbatim, and
        `authorised_body` the exact body it signs (docs/protocol.md, "Buyer request signatures").
    settlement_record_id, settlement_index: (release) the SETTLEMENT leaf the escrow went into.
    reason: (refund) why the job did not deliver.
    """

    SCHEMA: ClassVar[str] = "midgate.escrow.v1"
    schema_id: Literal["midgate.escrow.v1"] = "midgate.escrow.v1"
    event: EscrowEvent
    job_id: Ident
    buyer: Ident
    amount_minor: int = Field(ge=0, le=10**15)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    quote_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_ms: TimeMs
    authorisation: str = Field(default="", max_length=8192)
    authorised_body: str = Field(default="", max_length=8192)
    settlement_record_id: ShortText = ""
    settlement_index: int | None = Field(default=None, ge=0)
    reason: ShortText = ""

    @property
    def kind(self) -> LeafKind:
        return EVENT_KIND[self.event]


def decode_escrow_record(data: bytes) -> EscrowRecord:
    """Parse an escrow leaf's body; it must be canonical (the bytes the log committed to)."""
    if len(data) > MAX_SIGNED_SIZE:
        raise TooLargeError("escrow record too large", limit=MAX_SIGNED_SIZE, found=len(data))
    try:
        record = EscrowRecord.model_validate_json(data)
    except ValidationError as error:
        raise MalformedError("not an escrow record", errors=error.error_count()) from None
    if record.canonical_json() != data:
        raise MalformedError("escrow record is not in canonical form")
    return record
