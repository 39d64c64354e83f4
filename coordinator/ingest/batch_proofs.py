"""Inclusion proofs for every leaf of a freshly appended batch, computed in memory.

For leaves [first, size) every hash on an RFC 9162 inclusion path is either a subtree that overlaps the batch
(computable from the batch's own leaf hashes) or a perfect subtree left of `first` that is a left sibling on the
path, which is always one of the compact-range border nodes of `first` -- and all of those are the left siblings in
the stored proof of leaf `first`. One stored proof read per batch therefore replaces one per leaf (measured: about
a third of ingest's per-report cost went into per-leaf proof reads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator.ledger.tree import inclusion_spans
from protocol.merkle import leaf_hash, node_hash

Span = tuple[int, int]


def _split(n: int) -> int:
    """Largest power of two smaller than n (n > 1), RFC 9162 §2.1.1."""
    return 1 << ((n - 1).bit_length() - 1)


def batch_inclusion_proofs(
    first: int, leaves: Sequence[bytes], stored_proof: Callable[[int, int], list[bytes]]
) -> list[list[bytes]]:
    """Proofs for leaves first..first+len(leaves)-1 in the tree of size first+len(leaves).

    `stored_proof(index, size)` reads one proof from the ledger; it is called once (for leaf `first`), or per leaf
    should a needed border hash be missing (which the argument above rules out).
    """
    size = first + len(leaves)
    hashes = [leaf_hash(data) for data in leaves]
    border: dict[Span, bytes] = {}
    if first > 0:
        spans = inclusion_spans(first, size)
        for span, value in zip(spans, stored_proof(first, size), strict=True):
            if span[1] <= first:
                border[span] = value
    memo: dict[Span, bytes] = {}

    def tree_hash(lo: int, hi: int) -> bytes:
        found = border.get((lo, hi)) or memo.get((lo, hi))
        if found is not None:
            return found
        if hi <= first:
            raise KeyError((lo, hi))
        if hi - lo == 1:
            return hashes[lo - first]
        k = _split(hi - lo)
        value = node_hash(tree_hash(lo, lo + k), tree_hash(lo + k, hi))
        memo[(lo, hi)] = value
        return value

    proofs = []
    for index in range(first, size):
        try:
            proofs.append([tree_hash(lo, hi) for lo, hi in inclusion_spans(index, size)])
        except KeyError:
            proofs.append(stored_proof(index, size))
    return proofs
