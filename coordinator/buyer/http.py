"""The buyer API: `POST /v1/buyer/revenue` turns a buyer-signed RevenueReport into a ROYALTY leaf.

The buyer's signature is what triggers a royalty split, so the operator cannot invent revenue on a buyer's behalf and
the buyer cannot later deny a report. The ledger itself is the dedup store: the royalty record id is derived from
(buyer key, seq), so a replay is refused after a restart too, and no second table can drift from the log.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from coordinator.http_refusals import read_bounded_body, refusal
from coordinator.ledger.store import LedgerStore
from coordinator.provenance.shelf import ManifestShelf
from coordinator.registry.member_choices import Departure
from coordinator.royalties.ledger_records import departed_members, iter_splits, report_revenue
from protocol.envelope import decode, open_envelope, peek_envelope
from protocol.errors import (
    BadKeyError,
    PolicyViolationError,
    ProtocolError,
    Reason,
    ReplayedError,
    RevokedKeyError,
    TooLargeError,
    UnknownKeyError,
    UnknownModelError,
)
from protocol.identity import VerifierKey
from protocol.messages import RevenueReport
from protocol.provenance import is_manifest_reference

REVENUE_PATH = "/v1/buyer/revenue"


class RegisteredBuyer(Protocol):
    """A buyer the operator registered (`midgate coordinator buyer add`; coordinator.market.store.Buyer)."""

    @property
    def name(self) -> str: ...
    @property
    def key(self) -> VerifierKey: ...
    @property
    def revoked_ms(self) -> int | None: ...


class RegisteredBuyers(Protocol):
    """Where the registered buyers are looked up by key id, on every report (coordinator.market.store.MarketStore):
    an addition or revocation holds from the next report on, without a restart. Blocking."""

    def buyer_by_key_id(self, key_id_hex: str) -> RegisteredBuyer | None: ...


@dataclass(frozen=True)
class RoyaltyReceipt:
    record_id: str
    index: int
    receipt: str


def revenue_record_id(buyer_key: VerifierKey, seq: int) -> str:
    """The royalty record id of a (buyer key, seq): the dedup key, stored in the leaf itself."""
    return f"revenue-{buyer_key.key_id.hex()[:16]}-{seq}"


class RevenueDesk:
    """Checks buyer revenue reports and logs their royalty split. Blocking (SQLite, signing): call from a thread."""

    def __init__(
        self,
        mid: str,
        currency: str,
        buyer_keys: Mapping[str, str],
        ledger: LedgerStore,
        max_body_bytes: int,
        manifests: ManifestShelf | None = None,
        registered: RegisteredBuyers | None = None,
        departures: Callable[[], Iterable[Departure]] = lambda: (),
    ) -> None:
        self.mid = mid
        self.departures = departures
        """The MID's departed members (the registry's), whose royalties the model's policy may end."""
        self.registered = registered
        self.manifests = manifests
        self.currency = currency
        self.ledger = ledger
        self.max_body_bytes = max_body_bytes
        self._by_buyer: dict[str, VerifierKey] = {}
        for buyer, text in buyer_keys.items():
            try:
                self._by_buyer[buyer] = VerifierKey.parse(text)
            except BadKeyError as error:
                raise BadKeyError(f"[buyers.keys] {buyer}: {error.message}", buyer=buyer) from None
        self._trusted = {key.key_id.hex(): key for key in self._by_buyer.values()}
        # One report at a time: the replay check and the append must not interleave.
        self._lock = threading.Lock()

    def accept(self, envelope: bytes, now_ms: int) -> RoyaltyReceipt:
        if len(envelope) > self.max_body_bytes:
            raise TooLargeError("revenue report too large", limit=self.max_body_bytes, size=len(envelope))
        trusted, names = self._signers(envelope)
        verified = open_envelope(envelope, trusted, RevenueReport.PAYLOAD_TYPE)
        report = decode(verified, RevenueReport)
        buyer_key = verified.signer
        if report.buyer not in names.get(buyer_key.key_id.hex(), ()):
            raise UnknownKeyError("report is not signed by the key configured for its buyer", buyer=report.buyer)
        if report.mid != self.mid:
            raise PolicyViolationError("report is for another MID", expected=self.mid, found=report.mid)
        if report.currency != self.currency:
            raise PolicyViolationError(
                "report currency is not the MID's", expected=self.currency, found=report.currency
            )
        record_id = revenue_record_id(buyer_key, report.seq)
        model_version = self.model_version(report.model_version)
        with self._lock:
            if any(split.record.inputs.record_id == record_id for split in iter_splits(self.ledger)):
                raise ReplayedError("this buyer key already reported this seq", buyer=report.buyer, seq=report.seq)
            index = report_revenue(
                self.ledger,
                model_version,
                report.amount_minor,
                record_id=record_id,
                created_ms=now_ms,
                currency=report.currency,
                departed=departed_members(self.departures()),
            )
        return RoyaltyReceipt(record_id, index, self.ledger.receipt(index))

    def _signers(self, envelope: bytes) -> tuple[dict[str, VerifierKey], dict[str, set[str]]]:
        """The keys that may have signed this envelope (by its unverified key ids) and the buyer names each key
        reports for: `[buyers.keys]`, then the registered buyers. A registered key that is revoked is refused
        `revoked_key` when no other trusted key is named."""
        trusted = dict(self._trusted)
        names: dict[str, set[str]] = {}
        for buyer, key in self._by_buyer.items():
            names.setdefault(key.key_id.hex(), set()).add(buyer)
        if self.registered is None:
            return trusted, names
        key_ids = peek_envelope(envelope, max_size=self.max_body_bytes)[2][:4]
        revoked = None
        for key_id in key_ids:
            found = self.registered.buyer_by_key_id(key_id)
            if found is None:
                continue
            if found.revoked_ms is not None:
                revoked = revoked or found
                continue
            trusted[key_id] = found.key
            names.setdefault(key_id, set()).add(found.name)
        if revoked is not None and not any(key_id in trusted for key_id in key_ids):
            raise RevokedKeyError("the buyer's key is revoked", buyer=revoked.name, revoked_ms=revoked.revoked_ms)
        return trusted, names

    def model_version(self, named: str) -> str:
        """The model version a report names: as in its settlement, or by its provenance manifest
        (`manifest:<sha256>`, protocol.provenance), which must be one this MID issued (UnknownModelError)."""
        if not is_manifest_reference(named):
            return named
        if self.manifests is None:
            raise UnknownModelError("this MID resolves no manifest references", reference=named)
        return self.manifests.resolve(named).model_version


def revenue_router(desk: RevenueDesk, on_refusal: Callable[[Reason], None] = lambda reason: None) -> APIRouter:
    router = APIRouter()

    @router.post(REVENUE_PATH)
    async def revenue(request: Request) -> Response:
        try:
            body = await read_bounded_body(request, desk.max_body_bytes, "revenue report")
            receipt = await asyncio.to_thread(desk.accept, body, time.time_ns() // 1_000_000)
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return JSONResponse({"record_id": receipt.record_id, "index": receipt.index, "receipt": receipt.receipt})

    return router
