"""In-memory batch inclusion proofs equal the ledger's stored proofs and verify, for every batch shape."""

from __future__ import annotations

from pathlib import Path

from coordinator.ingest.batch_proofs import batch_inclusion_proofs
from coordinator.ledger.store import LedgerStore
from protocol.identity import SignerKey
from protocol.merkle import leaf_hash, verify_inclusion


def test_batch_proofs_match_stored_proofs_for_many_batch_shapes(tmp_path: Path) -> None:
    ledger = LedgerStore.open(tmp_path / "l.sqlite", SignerKey.generate("midgate/riverside"))
    calls = []

    def stored(index: int, size: int) -> list[bytes]:
        calls.append(index)
        return ledger.inclusion_proof(index, size)

    batches = [1, 1, 2, 3, 5, 8, 1, 13, 7, 64, 1, 31, 100]
    n = 0
    for count in batches:
        leaves = [b"leaf-%d" % (n + i) for i in range(count)]
        first = ledger.append(leaves).first_index
        calls.clear()
        proofs = batch_inclusion_proofs(first, leaves, stored)
        assert calls == ([first] if first else [])
        for offset, proof in enumerate(proofs):
            assert proof == ledger.inclusion_proof(first + offset, ledger.size)
            verify_inclusion(first + offset, ledger.size, leaf_hash(leaves[offset]), proof, ledger.root())
        n += count
