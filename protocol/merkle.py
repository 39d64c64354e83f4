"""RFC 9162 §2.1 Merkle tree hashing, proof verification and the compact range a log appends with.

Pure functions over bytes, after transparency-dev/merkle `proof/verify.go`: every size and length is validated
before any hashing, and every rejection is a typed error naming what was expected and what was found.

    leaf hash  = SHA-256(0x00 || leaf bytes)
    node hash  = SHA-256(0x01 || left || right)
    empty tree = SHA-256("")

Consistency from size 0 follows C2SP tlog-witness, not transparency-dev: the empty tree is a prefix of every tree,
so a proof from size 0 must be empty and is then valid, whatever root the caller holds for size 0 (a witness keeps
no root for it). A tree of size 0 that is *claimed* as the new tree must have the empty-tree root.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from protocol.errors import BadProofError, RootMismatchError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
# A proof for a tree of at most 2^64 leaves has at most 64 hashes; tlog-witness caps consistency proofs at 63 lines.
MAX_PROOF_HASHES = 64
_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """The RFC 9162 hash of one leaf's exact bytes."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 hash of an interior node from its two children."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 9162 §2.1.1 tree hash over the leaves' exact bytes, in order; EMPTY_ROOT for no leaves.

    Bottom-up, level by level: pairing adjacent nodes and promoting an unpaired last node unchanged gives the same
    tree as the RFC's split at the largest power of two below n.
    """
    if not leaves:
        return EMPTY_ROOT
    level = [leaf_hash(item) for item in leaves]
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that the leaf with hash `leaf` sits at `index` in the tree of `size` with `root`.

    Requires 0 <= index < size. Raises BadProofError (shape) or RootMismatchError (content).
    """
    calculated = root_from_inclusion_proof(index, size, leaf, proof)
    _require_match(calculated, root)


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` yields for leaf hash `leaf` at `index` in a tree of `size`. Requires 0 <= index < size."""
    if not 0 <= index < size:
        raise BadProofError("leaf index must be below the tree size", index=index, size=size)
    if len(leaf) != HASH_SIZE:
        raise BadProofError("leaf hash has the wrong length", expected=HASH_SIZE, found=len(leaf))
    inner, border = _decompose_inclusion(index, size)
    if len(proof) != inner + border:
        raise BadProofError("inclusion proof has the wrong number of hashes", expected=inner + border, found=len(proof))
    _check_hash_lengths(proof)
    result = _chain_inner(leaf, proof[:inner], index)
    return _chain_border_right(result, proof[inner:])


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Check that the tree of `size1` with `root1` is a prefix of the tree of `size2` with `root2`.

    Requires 0 <= size1 <= size2. From size 0 the proof must be empty and is then valid (C2SP tlog-witness); a tree
    of size 0 claimed as the new tree must carry the empty-tree root. Raises BadProofError (shape) or
    RootMismatchError (content).
    """
    _check_consistency_shape(size1, size2, proof)
    if size1 == 0:
        if proof:
            raise BadProofError("a consistency proof from size 0 must be empty", size2=size2, found=len(proof))
        if size2 == 0:
            _require_match(root1, root2)
            _require_match(EMPTY_ROOT, root2)
        return
    _require_match(root_from_consistency_proof(size1, size2, proof, root1), root2)


def root_from_consistency_proof(size1: int, size2: int, proof: Sequence[bytes], root1: bytes) -> bytes:
    """The root of the tree of `size2` that `proof` yields from the tree of `size1` with `root1`.

    Also checks that the proof reproduces `root1`. Requires 0 < size1 <= size2.
    """
    _check_consistency_shape(size1, size2, proof)
    if size1 == 0:
        raise BadProofError("no root can be derived from the empty tree", size1=size1, size2=size2)
    if size1 == size2:
        if proof:
            raise BadProofError("proof must be empty when size1 equals size2", size=size1, found=len(proof))
        return root1
    if not proof:
        raise BadProofError("consistency proof is empty", size1=size1, size2=size2)
    _check_hash_lengths(proof)
    inner, border = _decompose_inclusion(size1 - 1, size2)
    shift = _trailing_zeros(size1)
    inner -= shift
    # The proof starts with the hash of the subtree of size 2^shift, unless size1 is exactly that subtree.
    seed, start = (root1, 0) if size1 == 1 << shift else (proof[0], 1)
    if len(proof) != start + inner + border:
        raise BadProofError(
            "consistency proof has the wrong number of hashes", expected=start + inner + border, found=len(proof)
        )
    rest = proof[start:]
    mask = (size1 - 1) >> shift
    hash1 = _chain_inner_right(seed, rest[:inner], mask)
    hash1 = _chain_border_right(hash1, rest[inner:])
    _require_match(hash1, root1)
    hash2 = _chain_inner(seed, rest[:inner], mask)
    return _chain_border_right(hash2, rest[inner:])


def _check_consistency_shape(size1: int, size2: int, proof: Sequence[bytes]) -> None:
    if size1 < 0 or size2 < size1:
        raise BadProofError("consistency needs 0 <= size1 <= size2", size1=size1, size2=size2)
    if len(proof) > MAX_PROOF_HASHES:
        raise BadProofError("proof too long", limit=MAX_PROOF_HASHES, found=len(proof))


def _require_match(calculated: bytes, expected: bytes) -> None:
    if calculated != expected:
        raise RootMismatchError(
            "calculated root does not match the expected root", expected=b64(expected), calculated=b64(calculated)
        )


def _check_hash_lengths(proof: Sequence[bytes]) -> None:
    for position, value in enumerate(proof):
        if len(value) != HASH_SIZE:
            raise BadProofError(
                "proof hash has the wrong length", position=position, expected=HASH_SIZE, found=len(value)
            )


def _decompose_inclusion(index: int, size: int) -> tuple[int, int]:
    """Lengths of the inner part (below where the paths to `index` and `size-1` split) and the border part."""
    inner = (index ^ (size - 1)).bit_length()
    border = bin(index >> inner).count("1")
    return inner, border


def _trailing_zeros(value: int) -> int:
    return (value & -value).bit_length() - 1


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, sibling in enumerate(proof):
        seed = node_hash(seed, sibling) if (index >> i) & 1 == 0 else node_hash(sibling, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, sibling in enumerate(proof):
        if (index >> i) & 1 == 1:
            seed = node_hash(sibling, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for sibling in proof:
        seed = node_hash(sibling, seed)
    return seed


def b64(data: bytes) -> str:
    """Standard base64, as every C2SP text format uses."""
    return base64.b64encode(data).decode()
