"""What the agent trusts about its MID's ledger: the last checkpoint it verified, and how it checks receipts.

A receipt counts only if its inclusion proof verifies against a checkpoint signed by the MID key *and* that
checkpoint is consistent with the last one this agent trusts (RFC 9162 consistency proof, fetched from the MID's
HTTP API, which need not be trusted: the proof is checked). Checkpoints only move forward; an older one is checked
against the trusted one rather than replacing it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from protocol.checkpoint import Checkpoint, verify_receipt
from protocol.envelope import decode, open_envelope
from protocol.errors import InconsistentError, MalformedError, ProtocolError, ReplayedError, RootMismatchError
from protocol.identity import VerifierKey
from protocol.leaves import Leaf, LeafKind
from protocol.merkle import HASH_SIZE, verify_consistency
from protocol.messages import Receipt

MAX_PROOF_RESPONSE = 64 * 1024
ConsistencyFetcher = Callable[[int, int], list[bytes]]


@dataclass(frozen=True)
class SettledReport:
    seq: int
    leaf_index: int
    tree_size: int
    envelope_sha256: str


class ProofUnavailableError(Exception):
    """The MID's API could not be reached for a consistency proof; try again later (nothing is settled)."""


def http_consistency_fetcher(base_url: str, timeout_s: float = 10.0) -> ConsistencyFetcher:
    def fetch(old: int, new: int) -> list[bytes]:
        url = f"{base_url.rstrip('/')}/v1/consistency?old={old}&new={new}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                body = response.read(MAX_PROOF_RESPONSE + 1)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ProofUnavailableError(str(exc)) from exc
        if len(body) > MAX_PROOF_RESPONSE:
            raise MalformedError("consistency proof response too large")
        try:
            proof = [base64.b64decode(line, validate=True) for line in body.decode("ascii").splitlines()]
        except (UnicodeDecodeError, binascii.Error, ValueError) as exc:
            raise MalformedError("consistency proof is not base64 lines") from exc
        if any(len(h) != HASH_SIZE for h in proof):
            raise MalformedError("consistency proof hash of the wrong size")
        return proof

    return fetch


class LedgerView:
    """Not thread-safe: the agent calls it from its one database thread."""

    def __init__(
        self,
        mid_key: VerifierKey,
        device_key_id: str,
        fetch: ConsistencyFetcher,
        trusted: tuple[int, bytes] | None,
    ) -> None:
        self.mid_key = mid_key
        self.device_key_id = device_key_id
        self._fetch = fetch
        self.trusted = trusted
        self._known_roots: dict[int, bytes] = {} if trusted is None else {trusted[0]: trusted[1]}

    def check_checkpoint(self, checkpoint: Checkpoint) -> bool:
        """Raise if `checkpoint` is inconsistent with the trusted one; True when it became the new trusted one."""
        size, root = checkpoint.size, checkpoint.root
        known = self._known_roots.get(size)
        if known is not None:
            if known != root:
                raise RootMismatchError("two checkpoints of the same size with different roots", size=size)
            return False
        if self.trusted is None:
            self._trust(size, root)
            return True
        t_size, t_root = self.trusted
        if size > t_size:
            verify_consistency(t_size, size, self._fetch(t_size, size), t_root, root)
            self._trust(size, root)
            return True
        verify_consistency(size, t_size, self._fetch(size, t_size), root, t_root)
        self._known_roots[size] = root
        return False

    def _trust(self, size: int, root: bytes) -> None:
        self.trusted = (size, root)
        self._known_roots[size] = root
        if len(self._known_roots) > 4096:
            self._known_roots = {size: root}

    def settle(self, receipt_envelope: bytes, envelope: bytes, kind: LeafKind, seq: int) -> SettledReport:
        """Verify a receipt for the report `envelope` (seq `seq`); raises a ProtocolError when it does not hold."""
        verified = open_envelope(receipt_envelope, {self.mid_key.key_id.hex(): self.mid_key}, Receipt.PAYLOAD_TYPE)
        receipt = decode(verified, Receipt)
        digest = hashlib.sha256(envelope).hexdigest()
        if receipt.device_key_id != self.device_key_id or receipt.seq != seq or receipt.envelope_sha256 != digest:
            raise ReplayedError("receipt is for another report", seq=seq, receipt_seq=receipt.seq)
        proven = verify_receipt(receipt.tlog_proof, Leaf(kind, envelope).encode(), self.mid_key)
        if proven.index != receipt.leaf_index:
            raise InconsistentError(
                "receipt index differs from its proof", index=receipt.leaf_index, proof=proven.index
            )
        self.check_checkpoint(proven.checkpoint.checkpoint)
        return SettledReport(seq, proven.index, proven.checkpoint.checkpoint.size, digest)

    def trusted_json(self) -> bytes:
        assert self.trusted is not None
        return json.dumps({"size": self.trusted[0], "root": base64.b64encode(self.trusted[1]).decode()}).encode()

    @staticmethod
    def parse_trusted(data: bytes | None) -> tuple[int, bytes] | None:
        if data is None:
            return None
        doc = json.loads(data)
        return int(doc["size"]), base64.b64decode(doc["root"])


def receipt_seq(receipt_envelope: bytes, mid_key: VerifierKey) -> int:
    """The seq a signed receipt is for (signature checked; proof not yet)."""
    verified = open_envelope(receipt_envelope, {mid_key.key_id.hex(): mid_key}, Receipt.PAYLOAD_TYPE)
    return decode(verified, Receipt).seq


__all__ = ["LedgerView", "ProofUnavailableError", "ProtocolError", "SettledReport", "http_consistency_fetcher"]
