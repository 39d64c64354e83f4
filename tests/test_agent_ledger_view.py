"""The agent accepts a receipt only if its checkpoint is consistent with the one it trusts."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.ledger.store import LedgerStore
from edge.agent.ledger_view import LedgerView
from protocol.checkpoint import Receipt as TlogProof
from protocol.errors import InconsistentError, ProtocolError, ReplayedError, RootMismatchError
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind
from protocol.messages import Receipt

NOW = 1_790_000_000_000


def _receipt(ledger: LedgerStore, key: SignerKey, index: int, seq: int, envelope: bytes, device_kid: str) -> bytes:
    import hashlib

    proof = TlogProof(index, tuple(ledger.inclusion_proof(index, ledger.size)), ledger.checkpoint())
    return Receipt(
        device_key_id=device_kid,
        seq=seq,
        envelope_sha256=hashlib.sha256(envelope).hexdigest(),
        leaf_index=index,
        tlog_proof=proof.text(),
        issued_ms=NOW,
    ).seal(key)


def test_receipts_verify_and_move_the_trusted_checkpoint_forward(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    ledger = LedgerStore.open(tmp_path / "l.sqlite", mid)
    fetched: list[tuple[int, int]] = []

    def fetch(old: int, new: int) -> list[bytes]:
        fetched.append((old, new))
        return ledger.consistency_proof(old, new)

    view = LedgerView(mid.verifier, "abcd0123", fetch, None)
    envelopes = [b"report-%d" % i for i in range(5)]
    for i, env in enumerate(envelopes):
        ledger.append_leaves([Leaf(LeafKind.CONTRIBUTION, env)])
        settled = view.settle(_receipt(ledger, mid, i, i + 1, env, "abcd0123"), env, LeafKind.CONTRIBUTION, i + 1)
        assert (settled.leaf_index, settled.tree_size) == (i, i + 1)
    assert view.trusted == (5, ledger.root()) and fetched == [(1, 2), (2, 3), (3, 4), (4, 5)]


def test_a_forked_log_is_refused(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    honest = LedgerStore.open(tmp_path / "a.sqlite", mid)
    forked = LedgerStore.open(tmp_path / "b.sqlite", mid)
    honest.append_leaves([Leaf(LeafKind.CONTRIBUTION, b"one"), Leaf(LeafKind.CONTRIBUTION, b"two")])
    forked.append_leaves([Leaf(LeafKind.CONTRIBUTION, b"one"), Leaf(LeafKind.CONTRIBUTION, b"TWO")])
    forked.append_leaves([Leaf(LeafKind.CONTRIBUTION, b"three")])
    view = LedgerView(mid.verifier, "abcd0123", forked.consistency_proof, (2, honest.root()))
    with pytest.raises((InconsistentError, RootMismatchError)):
        view.settle(_receipt(forked, mid, 2, 3, b"three", "abcd0123"), b"three", LeafKind.CONTRIBUTION, 3)
    assert view.trusted == (2, honest.root())


def test_receipt_for_other_bytes_or_seq_or_signer_is_refused(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    ledger = LedgerStore.open(tmp_path / "l.sqlite", mid)
    ledger.append_leaves([Leaf(LeafKind.CONTRIBUTION, b"mine")])
    view = LedgerView(mid.verifier, "abcd0123", ledger.consistency_proof, None)
    good = _receipt(ledger, mid, 0, 1, b"mine", "abcd0123")
    with pytest.raises(ReplayedError):
        view.settle(good, b"other", LeafKind.CONTRIBUTION, 1)
    with pytest.raises(ReplayedError):
        view.settle(good, b"mine", LeafKind.CONTRIBUTION, 2)
    impostor = _receipt(ledger, SignerKey.generate("midgate/riverside"), 0, 1, b"mine", "abcd0123")
    with pytest.raises(ProtocolError):
        view.settle(impostor, b"mine", LeafKind.CONTRIBUTION, 1)
    assert view.trusted is None
    assert view.settle(good, b"mine", LeafKind.CONTRIBUTION, 1).leaf_index == 0
