"""Ledger benchmark: durable batched appends vs plain SQLite inserts, proof generation/verification, receipts.

Baseline (same run, same machine, same settings): plain SQLite inserts of the same leaf rows into
`plain(idx INTEGER PRIMARY KEY, data BLOB)`, WAL, synchronous=FULL, one transaction per batch.

    .venv/bin/python bench/ledger_bench.py                 # the full 1,000,000-leaf run
    .venv/bin/python bench/ledger_bench.py --leaves 100000 # a quick run

Targets (issue 3): >= 40,000 leaves/s and >= 60 % of the plain rate; inclusion and consistency proof generation
< 1 ms and verification < 0.2 ms at 1M leaves; a member verifying 1,000 receipts against one checkpoint < 0.5 s.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from coordinator.ledger.store import LedgerReader, LedgerStore, connect
from protocol.checkpoint import parse_checkpoint_text, verify_receipt, verify_receipts
from protocol.identity import SignerKey
from protocol.leaves import Leaf, LeafKind
from protocol.merkle import leaf_hash, verify_consistency, verify_inclusion
from protocol.note import parse_note

LEAF_BYTES = 300


def leaf_pool(count: int, seed: int) -> list[bytes]:
    """Distinct ~300-byte typed leaves; batches cycle through the pool so data generation is not timed."""
    rng = random.Random(seed)
    return [Leaf(LeafKind.CONTRIBUTION, rng.randbytes(LEAF_BYTES - 6)).encode() for _ in range(count)]


class PlainTable:
    """The baseline: the same rows into `plain(idx INTEGER PRIMARY KEY, data BLOB)`, same pragmas, same batches."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path)
        self.conn.execute("CREATE TABLE plain(idx INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        self.size = 0

    def append(self, rows: list[bytes]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.executemany(
            "INSERT INTO plain(idx, data) VALUES (?, ?)",
            zip(range(self.size, self.size + len(rows)), rows, strict=True),
        )
        self.conn.execute("COMMIT")
        self.size += len(rows)


def timed_round(
    append: Callable[[list[bytes]], object], pool: list[bytes], leaves: int, batch: int
) -> tuple[float, float]:
    """Wall and CPU seconds to append `leaves` rows in batches of `batch`."""
    wall, cpu = time.perf_counter(), time.process_time()
    for first in range(0, leaves, batch):
        append(pool[: min(batch, leaves - first)])
    return time.perf_counter() - wall, time.process_time() - cpu


def per_call_ms(fn: Callable[[int], object], rounds: int) -> float:
    start = time.perf_counter()
    for i in range(rounds):
        fn(i)
    return (time.perf_counter() - start) * 1000 / rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaves", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved baseline/ledger rounds")
    parser.add_argument("--dir", type=Path, default=None, help="where to put the databases (default: a temp dir)")
    args = parser.parse_args()
    pool = leaf_pool(args.batch, seed=1)
    rng = random.Random(2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"leaves={args.leaves} batch={args.batch} leaf_bytes={LEAF_BYTES} synchronous=FULL journal=WAL")
        plain = PlainTable(work / "plain.db")
        key = SignerKey.generate("bench.example/log")
        store = LedgerStore.open(work / "ledger.db", key)
        # Interleaved rounds, so drift in the load of a shared machine hits baseline and ledger alike.
        plain_wall = plain_cpu = ledger_wall = ledger_cpu = 0.0
        per_round = args.leaves // args.rounds
        for _ in range(args.rounds):
            wall, cpu = timed_round(plain.append, pool, per_round, args.batch)
            plain_wall, plain_cpu = plain_wall + wall, plain_cpu + cpu
            wall, cpu = timed_round(store.append, pool, per_round, args.batch)
            ledger_wall, ledger_cpu = ledger_wall + wall, ledger_cpu + cpu
        plain.conn.close()
        total = per_round * args.rounds
        plain_rate, ledger_rate = total / plain_wall, total / ledger_wall
        for name, rate, wall, cpu in (
            ("plain sqlite (baseline)", plain_rate, plain_wall, plain_cpu),
            ("ledger                 ", ledger_rate, ledger_wall, ledger_cpu),
        ):
            print(f"append  {name}: {rate:10,.0f} leaves/s ({wall:.1f} s wall, {cpu:.1f} s cpu)")
        wall_ratio, cpu_ratio = ledger_rate / plain_rate, plain_cpu / ledger_cpu
        print(
            f"append  ratio ledger/plain     : {wall_ratio:.2f} wall, {cpu_ratio:.2f} cpu (target >= 0.60, >= 40,000/s)"
        )

        size = store.size
        note = store.checkpoint()
        root = parse_checkpoint_text(parse_note(note).text).root
        rounds = 2000
        indices = [rng.randrange(size) for _ in range(rounds)]
        gen_incl = per_call_ms(lambda i: store.inclusion_proof(indices[i], size), rounds)
        proofs = [store.inclusion_proof(indices[i], size) for i in range(rounds)]
        hashes = [leaf_hash(store.leaf(indices[i])) for i in range(rounds)]
        ver_incl = per_call_ms(lambda i: verify_inclusion(indices[i], size, hashes[i], proofs[i], root), rounds)
        sizes1 = [rng.randrange(1, size) for _ in range(rounds)]
        roots1 = {s: store.root_at(s) for s in sizes1}
        gen_cons = per_call_ms(lambda i: store.consistency_proof(sizes1[i], size), rounds)
        cproofs = [store.consistency_proof(s, size) for s in sizes1]
        ver_cons = per_call_ms(
            lambda i: verify_consistency(sizes1[i], size, cproofs[i], roots1[sizes1[i]], root), rounds
        )
        with LedgerReader.open_existing(work / "ledger.db") as cold:
            # A freshly opened reader: its in-memory cache of high subtrees fills during these calls.
            cold_incl = per_call_ms(lambda i: cold.inclusion_proof(indices[i], size), rounds)
            cold_cons = per_call_ms(lambda i: cold.consistency_proof(sizes1[i], size), rounds)
        print(f"proof   inclusion generate (writer)       : {gen_incl:.3f} ms  (target < 1 ms)")
        print(f"proof   inclusion generate (fresh reader) : {cold_incl:.3f} ms  (target < 1 ms)")
        print(f"proof   inclusion verify                  : {ver_incl:.3f} ms  (target < 0.2 ms)")
        print(f"proof   consistency generate (writer)     : {gen_cons:.3f} ms  (target < 1 ms)")
        print(f"proof   consistency generate (fresh reader): {cold_cons:.3f} ms  (target < 1 ms)")
        print(f"proof   consistency verify                : {ver_cons:.3f} ms  (target < 0.2 ms)")

        statement = [rng.randrange(size) for _ in range(1000)]
        receipts = [store.receipt(i) for i in statement]
        leaves = [store.leaf(i) for i in statement]
        vkey = store.verifier
        start = time.perf_counter()
        verify_receipts(list(zip(receipts, leaves, strict=True)), vkey)
        batch_s = time.perf_counter() - start
        start = time.perf_counter()
        for receipt, leaf in zip(receipts, leaves, strict=True):
            verify_receipt(receipt, leaf, vkey)
        naive_s = time.perf_counter() - start
        print(f"receipts 1,000, batch (one checkpoint check): {batch_s:.3f} s  (target < 0.5 s)")
        print(
            f"receipts 1,000, one by one (baseline)       : {naive_s:.3f} s  (batch/baseline {batch_s / naive_s:.2f})"
        )
        store.close()
        print(f"database size: {sum(f.stat().st_size for f in work.iterdir()) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
