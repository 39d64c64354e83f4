"""The agent accepts a receipt only if its checkpoint is consistent with the one it trusts (protocol.witness rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.ledger.store import LedgerStore
from edge.agent.ledger_view import HeldReport, LedgerView
from protocol.checkpoint import open_checkpoint
from protocol.errors import (
    BadNoteError,
    EquivocationError,
    InconsistentError,
    ProtocolError,
    RootMismatchError,
)
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind
from protocol.messages import ReceiptBatch, receipt_batch_json
from protocol.witness import verify_older_checkpoint

NOW = 1_790_000_000_000
KIND = LeafKind.CONTRIBUTION


def _batch(ledger: LedgerStore, entries: list[tuple[int, int]], size: int | None = None) -> ReceiptBatch:
    """A batch for (seq, leaf_index) pairs under the ledger's checkpoint of `size` (default: now)."""
    size = ledger.size if size is None else size
    note = ledger.checkpoint(size)
    paths = [(seq, index, ledger.inclusion_proof(index, size)) for seq, index in entries]
    return ReceiptBatch.parse(receipt_batch_json(note, paths, NOW))


def _held(reports: dict[int, bytes]) -> dict[int, HeldReport]:
    return {seq: (KIND, envelope) for seq, envelope in reports.items()}


def test_receipts_verify_and_move_the_trusted_checkpoint_forward(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    ledger = LedgerStore.open(tmp_path / "l.sqlite", mid)
    fetched: list[tuple[int, int]] = []

    def fetch(old: int, new: int) -> list[bytes]:
        fetched.append((old, new))
        return ledger.consistency_proof(old, new)

    view = LedgerView(mid.verifier, "abcd0123", fetch, None)
    for i in range(5):
        envelope = b"report-%d" % i
        ledger.append_leaves([Leaf(KIND, envelope)])
        outcome = view.settle_batch(_batch(ledger, [(i + 1, i)]), _held({i + 1: envelope}).get)
        assert [(r.leaf_index, r.tree_size) for r in outcome.settled] == [(i, i + 1)]
    assert view.trusted is not None and (view.trusted.size, view.trusted.root) == (5, ledger.root())
    assert fetched == [(1, 2), (2, 3), (3, 4), (4, 5)]
    # The persisted note resumes the same trust.
    assert view.trusted_note is not None
    resumed = LedgerView(mid.verifier, "abcd0123", fetch, view.trusted_note)
    assert resumed.trusted == view.trusted


def test_a_batch_for_reports_no_longer_held_fetches_nothing(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    ledger = LedgerStore.open(tmp_path / "l.sqlite", mid)
    ledger.append_leaves([Leaf(KIND, b"a"), Leaf(KIND, b"b")])

    def fetch(old: int, new: int) -> list[bytes]:
        raise AssertionError("no proof should be needed")

    view = LedgerView(mid.verifier, "abcd0123", fetch, None)
    outcome = view.settle_batch(_batch(ledger, [(1, 0), (2, 1)]), {}.get)
    assert not outcome.settled and not outcome.refused and view.trusted is None


def test_a_forked_log_is_refused(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    honest = LedgerStore.open(tmp_path / "a.sqlite", mid)
    forked = LedgerStore.open(tmp_path / "b.sqlite", mid)
    honest.append_leaves([Leaf(KIND, b"one"), Leaf(KIND, b"two")])
    forked.append_leaves([Leaf(KIND, b"one"), Leaf(KIND, b"TWO")])
    forked.append_leaves([Leaf(KIND, b"three")])
    view = LedgerView(mid.verifier, "abcd0123", forked.consistency_proof, honest.checkpoint())
    with pytest.raises((InconsistentError, RootMismatchError)):
        view.settle_batch(_batch(forked, [(3, 2)]), _held({3: b"three"}).get)
    assert view.trusted_note == honest.checkpoint()


def test_same_size_other_root_is_equivocation_with_evidence(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    honest = LedgerStore.open(tmp_path / "a.sqlite", mid)
    forked = LedgerStore.open(tmp_path / "b.sqlite", mid)
    honest.append_leaves([Leaf(KIND, b"one"), Leaf(KIND, b"two")])
    forked.append_leaves([Leaf(KIND, b"one"), Leaf(KIND, b"TWO")])
    view = LedgerView(mid.verifier, "abcd0123", forked.consistency_proof, honest.checkpoint())
    with pytest.raises(EquivocationError):
        view.settle_batch(_batch(forked, [(2, 1)]), _held({2: b"TWO"}).get)
    assert len(view.log.evidence) == 1 and view.trusted_note == honest.checkpoint()


def test_a_late_receipt_under_an_older_consistent_checkpoint_counts_without_moving_trust(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    ledger = LedgerStore.open(tmp_path / "l.sqlite", mid)
    ledger.append_leaves([Leaf(KIND, b"r1")])
    old = _batch(ledger, [(1, 0)])
    ledger.append_leaves([Leaf(KIND, b"r2"), Leaf(KIND, b"r3")])
    view = LedgerView(mid.verifier, "abcd0123", ledger.consistency_proof, ledger.checkpoint())
    outcome = view.settle_batch(old, _held({1: b"r1"}).get)
    assert [(r.leaf_index, r.tree_size) for r in outcome.settled] == [(0, 1)]
    assert view.trusted_note == ledger.checkpoint()


def test_older_checkpoint_rule_is_a_pure_protocol_function(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    honest = LedgerStore.open(tmp_path / "a.sqlite", mid)
    forked = LedgerStore.open(tmp_path / "b.sqlite", mid)
    honest.append_leaves([Leaf(KIND, b"x%d" % i) for i in range(3)])
    honest.append_leaves([Leaf(KIND, b"x%d" % i) for i in range(3, 7)])
    forked.append_leaves([Leaf(KIND, b"y%d" % i) for i in range(3)])
    trusted = open_checkpoint(honest.checkpoint(), mid.verifier).checkpoint
    older = open_checkpoint(honest.checkpoint(3), mid.verifier).checkpoint
    verify_older_checkpoint(older, trusted, honest.consistency_proof(3, 7))
    alien = open_checkpoint(forked.checkpoint(), mid.verifier).checkpoint
    with pytest.raises(RootMismatchError):
        verify_older_checkpoint(alien, trusted, honest.consistency_proof(3, 7))
    with pytest.raises(InconsistentError):
        verify_older_checkpoint(trusted, older, [])
    with pytest.raises(EquivocationError):
        verify_older_checkpoint(alien, open_checkpoint(honest.checkpoint(3), mid.verifier).checkpoint, [])


def test_receipt_for_other_bytes_or_seq_or_signer_is_refused(tmp_path: Path) -> None:
    mid = SignerKey.generate("midgate/riverside")
    ledger = LedgerStore.open(tmp_path / "l.sqlite", mid)
    ledger.append_leaves([Leaf(KIND, b"mine"), Leaf(KIND, b"next")])
    view = LedgerView(mid.verifier, "abcd0123", ledger.consistency_proof, None)
    good = _batch(ledger, [(1, 0)])
    refused = view.settle_batch(good, _held({1: b"other"}).get)
    assert not refused.settled and [seq for seq, _ in refused.refused] == [1]
    wrong_index = _batch(ledger, [(1, 1)])
    assert not view.settle_batch(wrong_index, _held({1: b"mine"}).get).settled
    impostor = SignerKey.generate("midgate/riverside")
    forged = ReceiptBatch.parse(
        receipt_batch_json(LedgerStore.open(tmp_path / "f.sqlite", impostor).checkpoint(), [(1, 0, [])], NOW)
    )
    with pytest.raises((BadNoteError, ProtocolError)):
        view.settle_batch(forged, _held({1: b"mine"}).get)
    settled = view.settle_batch(good, _held({1: b"mine"}).get).settled
    assert [r.leaf_index for r in settled] == [0]
