"""A whole Merkle tree in memory: the test oracle the ledger store's proofs are compared with (same RFC 9162
hashing, built from a list of leaves with coordinator.ledger.tree's own span walks)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from coordinator.ledger.tree import (
    CompactRange,
    NodeId,
    consistency_spans,
    fold,
    hashes_for_spans,
    inclusion_spans,
    tile,
)
from protocol.merkle import leaf_hash


class MemoryTree:
    """The same proofs as the store, from a list of leaves."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        self.levels: list[list[bytes]] = [[]]
        self.range = CompactRange()
        for data in leaves:
            self.append(data)

    @property
    def size(self) -> int:
        return self.range.size

    def append(self, data: bytes) -> None:
        for level, nodes in enumerate(self.range.extend([leaf_hash(data)])):
            if len(self.levels) <= level:
                self.levels.append([])
            self.levels[level].extend(nodes)

    def read(self, ids: Sequence[NodeId]) -> dict[NodeId, bytes]:
        return {(level, index): self.levels[level][index] for level, index in ids}

    def root(self, size: int | None = None) -> bytes:
        return fold(self.read(tile(0, self.size if size is None else size)).values())

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return hashes_for_spans(inclusion_spans(index, size), self.read)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        return hashes_for_spans(consistency_spans(size1, size2), self.read)
