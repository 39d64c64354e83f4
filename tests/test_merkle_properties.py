"""Property tests: every generated proof verifies, and any altered byte, size or leaf makes it fail.

Proof generation is also checked against a direct transcription of RFC 9162 §2.1 (recursive MTH, PATH, SUBPROOF)
written here, independent of the project's iterative span code.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_tree import MemoryTree

from coordinator.ledger.tree import CompactRange
from protocol.errors import BadProofError, ProtocolError, RootMismatchError
from protocol.merkle import EMPTY_ROOT, leaf_hash, verify_consistency, verify_inclusion

MAX_LEAVES = 3000
_TREE = MemoryTree(i.to_bytes(4, "big") * (i % 5) for i in range(MAX_LEAVES))


def _mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(leaves[:k]) + _mth(leaves[k:])).digest()


def _path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*_path(m, leaves[:k]), _mth(leaves[k:])]
    return [*_path(m - k, leaves[k:]), _mth(leaves[:k])]


def _subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [_mth(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), _mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), _mth(leaves[:k])]


def _leaves(n: int) -> list[bytes]:
    return [i.to_bytes(4, "big") * (i % 5) for i in range(n)]


def _flip(value: bytes, position: int) -> bytes:
    position %= len(value)
    return value[:position] + bytes([value[position] ^ 0x01]) + value[position + 1 :]


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0, max_value=130), st.data())
def test_generation_matches_rfc_transcription(size: int, data: st.DataObject) -> None:
    leaves = _leaves(size)
    tree = MemoryTree(leaves)
    assert tree.root() == _mth(leaves)
    if size:
        index = data.draw(st.integers(0, size - 1))
        assert tree.inclusion_proof(index, size) == _path(index, leaves)
        size1 = data.draw(st.integers(1, size))
        expected = [] if size1 == size else _subproof(size1, leaves, True)
        assert tree.consistency_proof(size1, size) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_LEAVES), st.data())
def test_every_inclusion_proof_verifies_and_any_change_fails(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1))
    root = _TREE.root(size)
    leaf = _TREE.levels[0][index]
    proof = _TREE.inclusion_proof(index, size)
    verify_inclusion(index, size, leaf, proof, root)

    with pytest.raises(RootMismatchError):
        verify_inclusion(index, size, leaf, proof, _flip(root, data.draw(st.integers(0, 31))))
    with pytest.raises(RootMismatchError):
        verify_inclusion(index, size, _flip(leaf, data.draw(st.integers(0, 31))), proof, root)
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1))
        bad = [*proof[:at], _flip(proof[at], data.draw(st.integers(0, 31))), *proof[at + 1 :]]
        with pytest.raises(RootMismatchError):
            verify_inclusion(index, size, leaf, bad, root)
    other_index = data.draw(st.integers(0, size))
    if other_index != index:
        with pytest.raises(ProtocolError):
            verify_inclusion(other_index, size, leaf, proof, root)
    # The size is bound to the root by the signed checkpoint (tested with receipts); here: the proof for one size
    # does not verify against the real tree of another size.
    other_size = data.draw(st.integers(index + 1, MAX_LEAVES))
    if other_size != size:
        with pytest.raises(ProtocolError):
            verify_inclusion(index, other_size, leaf, proof, _TREE.root(other_size))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_LEAVES), st.data())
def test_every_consistency_proof_verifies_and_any_change_fails(size2: int, data: st.DataObject) -> None:
    size1 = data.draw(st.integers(1, size2))
    root1, root2 = _TREE.root(size1), _TREE.root(size2)
    proof = _TREE.consistency_proof(size1, size2)
    verify_consistency(size1, size2, proof, root1, root2)

    with pytest.raises(RootMismatchError):
        verify_consistency(size1, size2, proof, _flip(root1, data.draw(st.integers(0, 31))), root2)
    with pytest.raises(RootMismatchError):
        verify_consistency(size1, size2, proof, root1, _flip(root2, data.draw(st.integers(0, 31))))
    if proof:
        at = data.draw(st.integers(0, len(proof) - 1))
        bad = [*proof[:at], _flip(proof[at], data.draw(st.integers(0, 31))), *proof[at + 1 :]]
        with pytest.raises(RootMismatchError):
            verify_consistency(size1, size2, bad, root1, root2)
        with pytest.raises(BadProofError):
            verify_consistency(size1, size2, proof[:-1], root1, root2)
    for other1 in {size1 - 1, size1 + 1} - {0, size1, size2 + 1}:
        with pytest.raises(ProtocolError):
            verify_consistency(other1, size2, proof, _TREE.root(other1), root2)
    if size1 < size2 < MAX_LEAVES:
        with pytest.raises(ProtocolError):
            verify_consistency(size1, size2 + 1, proof, root1, _TREE.root(size2 + 1))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=12))
def test_batched_extension_equals_leaf_by_leaf(batch_sizes: list[int]) -> None:
    batched, single = CompactRange(), CompactRange()
    for n in batch_sizes:
        hashes = [leaf_hash(bytes([batched.size % 256, n % 256])) for _ in range(n)]
        batched.extend(hashes)
        for h in hashes:
            single.extend([h])
        assert batched.root() == single.root()
        assert batched.border == single.border


def test_consistency_from_size_zero_follows_c2sp() -> None:
    root = _TREE.root(5)
    verify_consistency(0, 5, [], EMPTY_ROOT, root)
    with pytest.raises(BadProofError):
        verify_consistency(0, 5, [root], EMPTY_ROOT, root)
    verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(RootMismatchError):
        verify_consistency(0, 0, [], root, root)
