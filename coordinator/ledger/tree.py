"""Merkle proof generation over stored perfect-subtree hashes, and the compact range the log appends with.

A node is named by (level, index): the perfect subtree of 2^level leaves starting at leaf index << level. The store
keeps every such hash, so any RFC 9162 proof is a fold of O(log n) stored hashes: the proof hash for a range that is
not a perfect subtree (the right border of a tree whose size is not a power of two) is the right-to-left fold of the
perfect subtrees that tile it, as transparency-dev/merkle's `proof.Nodes` "ephemeral" node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from protocol.merkle import EMPTY_ROOT, node_hash

NodeId = tuple[int, int]
# Reads the hashes of the named perfect subtrees (level 0 = leaf hashes) in one round trip.
NodeReader = Callable[[Sequence[NodeId]], Mapping[NodeId, bytes]]
Span = tuple[int, int]


def tile(lo: int, hi: int) -> list[NodeId]:
    """The perfect subtrees that tile leaves [lo, hi), left to right, largest first."""
    nodes: list[NodeId] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        if lo:
            level = min(level, (lo & -lo).bit_length() - 1)
        nodes.append((level, lo >> level))
        lo += 1 << level
    return nodes


def inclusion_spans(index: int, size: int) -> list[Span]:
    """The leaf ranges whose tree hashes form the RFC 9162 §2.1.3 inclusion path, leaf sibling first."""
    spans: list[Span] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            spans.append((lo + k, hi))
            hi = lo + k
        else:
            spans.append((lo, lo + k))
            lo = lo + k
    spans.reverse()
    return spans


def consistency_spans(size1: int, size2: int) -> list[Span]:
    """The leaf ranges whose tree hashes form the RFC 9162 §2.1.4 consistency proof from size1 to size2."""
    if size1 == 0 or size1 >= size2:
        return []
    spans: list[Span] = []
    lo, hi, complete = 0, size2, True
    while True:
        if size1 == hi:
            if not complete:
                spans.append((lo, hi))
            break
        k = _split(hi - lo)
        if size1 <= lo + k:
            spans.append((lo + k, hi))
            hi = lo + k
        else:
            spans.append((lo, lo + k))
            lo, complete = lo + k, False
    spans.reverse()
    return spans


def hashes_for_spans(spans: Sequence[Span], read: NodeReader) -> list[bytes]:
    """Each span's tree hash, reading all needed stored nodes in one call."""
    tiles = [tile(lo, hi) for lo, hi in spans]
    stored = read(sorted({node for nodes in tiles for node in nodes}))
    return [fold(stored[node] for node in nodes) for nodes in tiles]


def fold(hashes: Iterable[bytes]) -> bytes:
    """Tree hash of perfect subtrees given left to right with sizes descending: fold right to left."""
    items = list(hashes)
    if not items:
        return EMPTY_ROOT
    result = items[-1]
    for left in reversed(items[:-1]):
        result = node_hash(left, result)
    return result


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


@dataclass
class CompactRange:
    """The right border of the tree: hashes of the perfect subtrees tiling [0, size), largest first.

    Extending by a batch hashes each level of the batch once (about one node hash per leaf) and never rereads the
    tree: a new node's left child is either in the batch or on the old border.
    """

    size: int = 0
    border: list[bytes] = field(default_factory=list)

    def copy(self) -> CompactRange:
        return CompactRange(self.size, list(self.border))

    def extend(self, leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
        """Append leaf hashes; returns the batch's nodes level by level (`batch_layout` order), level 0 first.

        Level l holds the nodes with index in [start >> l, end >> l) for the batch's leaves [start, end).
        """
        start, end = self.size, self.size + len(leaf_hashes)
        old = dict(zip(_border_levels(start), self.border, strict=True))
        levels = [list(leaf_hashes)]
        sha256 = hashlib.sha256
        level = 0
        while (end >> (level + 1)) > (start >> (level + 1)):
            run = levels[level]
            if (start >> level) & 1:
                run = [old[level], *run]
            # Inlined node_hash: this comprehension runs about once per appended leaf.
            levels.append([sha256(b"\x01" + a + b).digest() for a, b in zip(run[0::2], run[1::2], strict=False)])
            level += 1
        border = []
        for lvl in _border_levels(end):
            created = levels[lvl] if lvl < len(levels) else []
            border.append(created[-1] if created else old[lvl])
        self.size, self.border = end, border
        return levels

    def root(self) -> bytes:
        return fold(self.border)

    @staticmethod
    def border_ids(size: int) -> list[NodeId]:
        return tile(0, size)


def batch_offset(start: int, end: int, level: int, index: int) -> int:
    """Position (in hashes) of node (level, index) in the flat layout of the batch of leaves [start, end)."""
    before = sum((end >> m) - (start >> m) for m in range(level))
    return before + index - (start >> level)


def last_leaf(level: int, index: int) -> int:
    """The index of the last leaf under node (level, index): the leaf whose append completes the node."""
    return ((index + 1) << level) - 1


def _border_levels(size: int) -> list[int]:
    return [level for level in range(size.bit_length() - 1, -1, -1) if (size >> level) & 1]
