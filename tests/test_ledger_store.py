"""The SQLite ledger store: batched appends, reopening, proofs, receipts, typed leaves, the async facade."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from memory_tree import MemoryTree

from coordinator.ledger import store as store_module
from coordinator.ledger.audit import audit_ledger
from coordinator.ledger.store import UPPER_LEVEL, LedgerReader, LedgerStore
from protocol.checkpoint import (
    RECEIPT_HEADER,
    open_checkpoint,
    parse_checkpoint_text,
    parse_receipt,
    verify_receipt,
    verify_receipts,
)
from protocol.errors import (
    BadProofError,
    BadSignatureError,
    InconsistentError,
    MalformedError,
    ProtocolError,
    RootMismatchError,
    TooLargeError,
    UnknownKeyError,
)
from protocol.identity import SignerKey
from protocol.leaves import MAX_SIGNED_SIZE, Leaf, LeafKind, decode_leaf
from protocol.merkle import leaf_hash, verify_consistency
from protocol.note import parse_note

BATCHES = [1, 2, 3, 7, 1, 16, 5]


@pytest.fixture
def log_key() -> SignerKey:
    return SignerKey.generate("mid.example/ledger")


@pytest.fixture
def filled(tmp_path: Path, log_key: SignerKey) -> Iterator[tuple[LedgerStore, MemoryTree, list[bytes]]]:
    leaves: list[bytes] = []
    tree = MemoryTree()
    with LedgerStore.open(tmp_path / "ledger.db", log_key) as store:
        for n, size in enumerate(BATCHES):
            batch = [Leaf(LeafKind(1 + (n + i) % 9), f"signed {n}/{i}".encode()).encode() for i in range(size)]
            result = store.append(batch)
            assert result.indices == range(len(leaves), len(leaves) + size)
            leaves.extend(batch)
            for data in batch:
                tree.append(data)
            assert store.root() == tree.root()
        yield store, tree, leaves


def test_proofs_match_the_reference_tree_for_every_index_and_size(
    filled: tuple[LedgerStore, MemoryTree, list[bytes]],
) -> None:
    store, tree, _ = filled
    for size in range(1, store.size + 1):
        assert store.root_at(size) == tree.root(size)
        for index in range(size):
            assert store.inclusion_proof(index, size) == tree.inclusion_proof(index, size)
        for size1 in range(size + 1):
            proof = store.consistency_proof(size1, size)
            assert proof == tree.consistency_proof(size1, size)
            verify_consistency(size1, size, proof, tree.root(size1), tree.root(size))


def test_checkpoint_after_each_batch_and_receipts_verify(
    filled: tuple[LedgerStore, MemoryTree, list[bytes]], log_key: SignerKey
) -> None:
    store, tree, leaves = filled
    sizes = [sum(BATCHES[: i + 1]) for i in range(len(BATCHES))]
    assert store.checkpoint_sizes() == sizes
    for size in sizes:
        checkpoint = open_checkpoint(store.checkpoint(size), log_key.verifier).checkpoint
        assert (checkpoint.origin, checkpoint.size, checkpoint.root) == (log_key.name, size, tree.root(size))
    for index, data in enumerate(leaves):
        receipt = store.receipt(index)
        assert receipt.startswith(f"{RECEIPT_HEADER}\nindex {index}\n")
        verified = verify_receipt(receipt, data, log_key.verifier)
        assert (verified.index, verified.checkpoint.checkpoint.size) == (index, store.size)
        with pytest.raises(RootMismatchError):
            verify_receipt(receipt, data + b"x", log_key.verifier)
    statement = [(store.receipt(i, sizes[-2]), leaves[i]) for i in range(sizes[-2])]
    assert len(verify_receipts(statement, log_key.verifier)) == sizes[-2]
    swapped = [(statement[0][0], statement[1][1]), (statement[1][0], statement[0][1]), *statement[2:]]
    with pytest.raises(RootMismatchError) as err:
        verify_receipts(swapped, log_key.verifier)
    assert err.value.details["receipt"] == 0


def test_receipt_with_altered_index_root_or_size_fails(
    filled: tuple[LedgerStore, MemoryTree, list[bytes]], log_key: SignerKey
) -> None:
    store, _, leaves = filled
    receipt = store.receipt(5)
    checkpoint = parse_checkpoint_text(parse_note(parse_receipt(receipt).checkpoint_note).text)
    with pytest.raises(ProtocolError):
        verify_receipt(receipt.replace("index 5\n", "index 6\n"), leaves[5], log_key.verifier)
    with pytest.raises(BadSignatureError):
        verify_receipt(
            receipt.replace(f"\n{checkpoint.size}\n", f"\n{checkpoint.size + 1}\n"), leaves[5], log_key.verifier
        )
    lines = receipt.split("\n")
    lines[2] = lines[2][:-4] + ("AAA=" if lines[2][-4:] != "AAA=" else "BBB=")
    with pytest.raises(RootMismatchError):
        verify_receipt("\n".join(lines), leaves[5], log_key.verifier)
    with pytest.raises(MalformedError):
        verify_receipt(receipt.replace("index 5", "index 05"), leaves[5], log_key.verifier)
    with pytest.raises(MalformedError):
        verify_receipt(receipt.replace(RECEIPT_HEADER, "c2sp.org/tlog-proof@v2"), leaves[5], log_key.verifier)


def test_reopen_restores_the_tree(tmp_path: Path, log_key: SignerKey) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path, log_key) as store:
        store.append([b"a", b"b", b"c"])
        root = store.root()
    with LedgerStore.open(path, log_key) as store:
        assert (store.size, store.root()) == (3, root)
        store.append([b"d"])
        assert store.root() == MemoryTree([b"a", b"b", b"c", b"d"]).root()
    with LedgerReader.open_existing(path) as reader:
        assert reader.size == 4
        assert reader.leaf(3) == b"d"
        assert [i for i, _ in reader.leaves(1, 3)] == [1, 2]
        assert [i for i, _ in reader.leaves(3, 99)] == [3]


def test_rejected_batches_change_nothing(tmp_path: Path, log_key: SignerKey) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path, log_key) as store:
        store.append([b"first"])
        before = (store.size, store.root(), store.checkpoint())
        with pytest.raises(TooLargeError):
            store.append([b"ok", b"x" * (MAX_SIGNED_SIZE + 7)])
        with pytest.raises(MalformedError):
            store.append([])
        assert (store.size, store.root(), store.checkpoint()) == before
        # A failure inside the transaction (a conflicting row) rolls back every row of the batch.
        conn = sqlite3.connect(path)
        conn.execute("INSERT INTO leaves(idx, data) VALUES (2, x'00')")
        conn.commit()
        conn.close()
        with pytest.raises(sqlite3.IntegrityError):
            store.append([b"second", b"third"])
        assert (store.size, store.root(), store.checkpoint()) == before
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM batches").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 1
    conn.close()


def test_a_second_writer_on_the_same_file_is_refused(tmp_path: Path, log_key: SignerKey) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path, log_key) as first, LedgerStore.open(path, log_key) as second:
        first.append([b"a"])
        with pytest.raises(InconsistentError):
            second.append([b"b"])
        assert second.size == 0
        first.append([b"c"])
    assert audit_ledger(path, log_key.verifier).size == 2


def test_open_refuses_another_log(tmp_path: Path, log_key: SignerKey) -> None:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path, log_key) as store:
        store.append([b"a"])
    with pytest.raises(MalformedError):
        LedgerStore.open(path, SignerKey.generate("other.example/ledger"))
    with pytest.raises(UnknownKeyError):
        LedgerStore.open(path, SignerKey.generate(log_key.name))  # same name, another key
    with pytest.raises(MalformedError):
        LedgerReader.open_existing(tmp_path / "missing.db")


def test_bounds_are_typed_errors(filled: tuple[LedgerStore, MemoryTree, list[bytes]]) -> None:
    store, _, _ = filled
    for call in (
        lambda: store.inclusion_proof(store.size),
        lambda: store.inclusion_proof(0, store.size + 1),
        lambda: store.consistency_proof(3, 2),
        lambda: store.checkpoint(4),  # no batch ended at size 4
        lambda: store.leaf(store.size),
        lambda: store.root_at(store.size + 1),
    ):
        with pytest.raises(BadProofError):
            call()


def test_empty_log(tmp_path: Path, log_key: SignerKey) -> None:
    with LedgerStore.open(tmp_path / "ledger.db", log_key) as store:
        checkpoint = open_checkpoint(store.checkpoint(), log_key.verifier).checkpoint
        assert (checkpoint.size, checkpoint.root) == (0, MemoryTree().root())
        assert store.consistency_proof(0) == []


def test_typed_leaves_round_trip_and_reject_ambiguity() -> None:
    for kind in LeafKind:
        leaf = Leaf(kind, b"\x00signed bytes\xff")
        encoded = leaf.encode()
        assert encoded[:2] == bytes([1, kind])
        assert decode_leaf(encoded) == leaf
    good = Leaf(LeafKind.CONTRIBUTION, b"dsse").encode()
    for bad in (good + b"x", good[:-1], b"\x02" + good[1:], good[:1] + b"\x00" + good[2:], good[:5], b""):
        with pytest.raises(MalformedError):
            decode_leaf(bad)
    # Kinds are appended, never renumbered: the values run 1, 2, 3, ... with no gap or reuse.
    assert [kind.value for kind in LeafKind] == list(range(1, len(LeafKind) + 1))


def test_appends_from_worker_threads_are_serialised(tmp_path: Path, log_key: SignerKey) -> None:
    """Event-loop code hands appends to worker threads (asyncio.to_thread), so they run concurrently on one store."""

    async def run() -> list[range]:
        ledger = LedgerStore.open(tmp_path / "ledger.db", log_key)
        try:
            results = await asyncio.gather(
                *(asyncio.to_thread(ledger.append, [bytes([i]) * 3] * (i + 1)) for i in range(8))
            )
            receipts = await asyncio.gather(*(asyncio.to_thread(ledger.receipt, r.first_index) for r in results))
            for result, receipt in zip(results, receipts, strict=True):
                verify_receipt(receipt, ledger.leaf(result.first_index), log_key.verifier)
            return [r.indices for r in results]
        finally:
            ledger.close()

    ranges = asyncio.run(run())
    # Concurrent appends are serialised: their index ranges tile the log without gaps or overlaps.
    assert sorted(i for r in ranges for i in r) == list(range(sum(range(1, 9))))
    with LedgerReader.open_existing(tmp_path / "ledger.db") as reader:
        assert reader.size == sum(range(1, 9))
        assert {leaf_hash(d) for _, d in reader.leaves(0, reader.size)} == {leaf_hash(bytes([i]) * 3) for i in range(8)}


def test_proofs_past_the_cached_levels_match_after_reopen(
    tmp_path: Path, log_key: SignerKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enough leaves that nodes of level >= UPPER_LEVEL exist: cached at append, and read back after reopening."""
    path = tmp_path / "ledger.db"
    tree = MemoryTree()
    rng = random.Random(7)
    with LedgerStore.open(path, log_key) as store:
        while store.size < 3 * (1 << UPPER_LEVEL):
            batch = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 700))]
            store.append(batch)
            for data in batch:
                tree.append(data)
        live = [(i, s) for s in rng.sample(range(1, store.size + 1), 40) for i in rng.sample(range(s), 3)]
        for index, size in live:
            assert store.inclusion_proof(index, size) == tree.inclusion_proof(index, size)
            assert store.consistency_proof(index + 1, size) == tree.consistency_proof(index + 1, size)
    with LedgerStore.open(path, log_key) as store:
        for index, size in live:
            assert store.inclusion_proof(index, size) == tree.inclusion_proof(index, size)
            assert store.consistency_proof(index, size) == tree.consistency_proof(index, size)
        assert store.root() == tree.root()
        monkeypatch.setattr(store_module, "LEAF_CHUNK", 100)
        assert [leaf_hash(d) for _, d in store.leaves(0, store.size)] == tree.levels[0]  # many chunks
        monkeypatch.setattr(store_module, "LEAF_CHUNK", 100)
        assert [leaf_hash(d) for _, d in store.leaves(0, store.size)] == tree.levels[0]  # many chunks
