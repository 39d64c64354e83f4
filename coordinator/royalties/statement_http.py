"""The member statement API: `POST /v1/member/statement` answers a device-signed StatementRequest with every
settlement and royalty leaf of the period that pays the device's member, each with its inclusion path under one
checkpoint (protocol/ledger_api.py; docs/protocol.md, "Member ledger API").

A member gets the leaves naming its own member id and no others: the member is the one the registry holds for the
signing device, whatever the request says. A member who left keeps this read: the key of a device revoked by the
member's LeaveNotice (and by nothing else) still signs statement requests, and only those, since ingest and the
broker refuse it everywhere else. The checkpoint is the latest witnessed one when it holds every leaf of the
answer, else the latest (the agent then reports the lines as not yet witnessed). Requests carry a nonce and a time
instead of a seq (a read must not spend the daemon's seqs): one outside `REQUEST_WINDOW_MS` of the coordinator's
clock is `stale_request`, a nonce seen within it `replayed`. Nonces are kept in memory only: after a restart a
request may be answered twice within its window, which gives its holder nothing it did not have.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import Response

from coordinator.http_refusals import read_bounded_body, refusal
from coordinator.ledger.store import LedgerStore
from coordinator.ledger.witnesses import WitnessDesk
from coordinator.registry.device_keys import DeviceKeys
from coordinator.royalties.settlement import decode_record
from protocol.checkpoint import parse_checkpoint_text
from protocol.envelope import decode, open_envelope
from protocol.errors import (
    PolicyViolationError,
    ProtocolError,
    QuorumNotMetError,
    Reason,
    ReplayedError,
    RevokedKeyError,
    StaleRequestError,
    TooLargeError,
    UnknownKeyError,
)
from protocol.leaves import LeafKind, decode_leaf
from protocol.ledger_api import MAX_STATEMENT_LEAVES, ProvenLeaf, StatementProof
from protocol.messages import StatementRequest
from protocol.note import parse_note

STATEMENT_PATH = "/v1/member/statement"
MAX_REQUEST_BYTES = 4 * 1024
REQUEST_WINDOW_MS = 5 * 60 * 1000
_SPLIT_KINDS = (LeafKind.SETTLEMENT, LeafKind.ROYALTY)


@dataclass(frozen=True)
class _Split:
    index: int
    created_ms: int
    members: frozenset[str]


class SplitLeaves:
    """Which leaves are settlement or royalty records and whom each pays: a follower of the log, read forward from
    where it stopped, so a statement never rescans the whole log."""

    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger
        self._read_to = 0
        self._splits: list[_Split] = []

    def paying(self, member: str, start_ms: int, end_ms: int) -> list[int]:
        """Indices of the records created in [start_ms, end_ms) with a payout to `member`, in log order."""
        for index, data in self.ledger.leaves(self._read_to, self.ledger.size):
            leaf = decode_leaf(data)
            if leaf.kind in _SPLIT_KINDS:
                record = decode_record(leaf.signed)
                members = frozenset(p.member for p in record.payouts)
                self._splits.append(_Split(index, record.inputs.created_ms, members))
            self._read_to = index + 1
        return [s.index for s in self._splits if member in s.members and start_ms <= s.created_ms < end_ms]


class StatementDesk:
    """Checks statement requests and builds their proven answers. Blocking (SQLite, signatures): call from a thread."""

    def __init__(self, mid: str, ledger: LedgerStore, devices: DeviceKeys, witnesses: WitnessDesk) -> None:
        self.mid = mid
        self.ledger = ledger
        self.devices = devices
        self.witnesses = witnesses
        self._splits = SplitLeaves(ledger)
        self._nonces: dict[tuple[str, str], int] = {}
        # One request at a time: the nonce check and the follower's read position must not interleave.
        self._lock = threading.Lock()

    def answer(self, envelope: bytes, now_ms: int) -> StatementProof:
        if len(envelope) > MAX_REQUEST_BYTES:
            raise TooLargeError("statement request too large", limit=MAX_REQUEST_BYTES, found=len(envelope))
        keys = self.devices.current()
        by_key_id = keys.by_key_id
        verified = open_envelope(
            envelope, {kid: d.verifier for kid, d in by_key_id.items()}, StatementRequest.PAYLOAD_TYPE
        )
        request = decode(verified, StatementRequest)
        device = by_key_id[verified.signer.key_id.hex()]
        if device.device_id != request.device:
            raise UnknownKeyError("request is not signed by the key of the device it names", device=request.device)
        if device.revoked and device.device_id not in keys.departed:
            # A key revoked because its member left stays the member's credential for this read alone: the member
            # keeps being paid royalties on models it helped train and must be able to see them.
            raise RevokedKeyError("the device's key is revoked", device=device.device_id)
        if request.mid != self.mid:
            raise PolicyViolationError("request is for another MID", expected=self.mid, found=request.mid)
        if abs(now_ms - request.issued_ms) > REQUEST_WINDOW_MS:
            raise StaleRequestError(
                "request time is outside the window", window_ms=REQUEST_WINDOW_MS, skew_ms=now_ms - request.issued_ms
            )
        with self._lock:
            self._remember(verified.signer.key_id.hex(), request.nonce, request.issued_ms, now_ms)
            indices = self._splits.paying(device.member_id, request.period_start_ms, request.period_end_ms)
        if len(indices) > MAX_STATEMENT_LEAVES:
            raise TooLargeError("too many records in this period: ask for a shorter one", found=len(indices))
        note = self._checkpoint_holding(max(indices, default=-1))
        size = parse_checkpoint_text(parse_note(note).text).size
        leaves = tuple(
            ProvenLeaf(
                index=index,
                leaf=base64.b64encode(self.ledger.leaf(index)).decode(),
                path=tuple(base64.b64encode(h).decode() for h in self.ledger.inclusion_proof(index, size)),
            )
            for index in indices
        )
        return StatementProof(
            mid=self.mid,
            member=device.member_id,
            period_start_ms=request.period_start_ms,
            period_end_ms=request.period_end_ms,
            checkpoint=note.decode(),
            leaves=leaves,
        )

    def _remember(self, key_id: str, nonce: str, issued_ms: int, now_ms: int) -> None:
        if (key_id, nonce) in self._nonces:
            raise ReplayedError("this request was answered already", key_id=key_id)
        oldest = now_ms - REQUEST_WINDOW_MS
        if len(self._nonces) > 4096:
            # A request issued before `oldest` is stale by now: its nonce need not be kept.
            self._nonces = {k: t for k, t in self._nonces.items() if t >= oldest}
        self._nonces[(key_id, nonce)] = issued_ms

    def _checkpoint_holding(self, last_index: int) -> bytes:
        """The latest witnessed checkpoint if it holds leaf `last_index`, else the latest checkpoint."""
        try:
            witnessed = self.witnesses.witnessed()
        except QuorumNotMetError:
            return self.ledger.checkpoint()
        if parse_checkpoint_text(parse_note(witnessed).text).size > last_index:
            return witnessed
        return self.ledger.checkpoint()


def statement_router(desk: StatementDesk, on_refusal: Callable[[Reason], None] = lambda reason: None) -> APIRouter:
    router = APIRouter()

    @router.post(STATEMENT_PATH)
    async def statement(request: Request) -> Response:
        try:
            body = await read_bounded_body(request, MAX_REQUEST_BYTES, "statement request")
            proof = await asyncio.to_thread(desk.answer, body, time.time_ns() // 1_000_000)
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return Response(proof.canonical_json(), media_type="application/json")

    return router
