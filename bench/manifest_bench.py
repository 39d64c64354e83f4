"""Provenance manifest benchmark: building a settled job's manifest from the log and verifying it offline.

A job with `--members` members and `--contributions` contribution leaves of its run is logged and settled in a real
SQLite ledger (the members' JOB leaf and settlement grow with them), then its manifest is built (one read of the log,
the contribution root, two inclusion proofs, the MID's signature) and verified as `midgate buyer verify-model` does.

Baseline (same run): verifying the settlement leaf's tlog-proof receipt alone (`verify_receipt`: one checkpoint
signature and one inclusion proof), which is what a manifest adds its other checks to.

    .venv/bin/python bench/manifest_bench.py                              # 1,000 members, 5,000 contributions
    .venv/bin/python bench/manifest_bench.py --members 5000 --contributions 50000
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from coordinator.ledger.store import LedgerStore
from coordinator.provenance.builder import build_manifest
from coordinator.provenance.log_index import LogIndex
from coordinator.royalties.ledger_records import settle_logged_job
from coordinator.royalties.policy import KnobPolicy, RoyaltyPolicy
from protocol.checkpoint import verify_receipt
from protocol.identity import SignerKey
from protocol.job_log import JobDeviceEntry, JobLogRecord, MemberValue, model_version
from protocol.leaves import Leaf, LeafKind
from protocol.messages import ContributionReport
from protocol.provenance import PurposeTerms, verify_manifest
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.spec import REGISTRY

RUN = 7
NOW = 1_790_000_000_000
POLICY = RoyaltyPolicy(
    version=1, fee_bps=1500, knob=KnobPolicy(base_price_minor=1000, min_price_minor=100, max_price_minor=10_000)
)


def contribution(device: SignerKey, seq: int, run_id: int = RUN) -> bytes:
    report = ContributionReport(
        run_id=run_id,
        round=1,
        node_id=seq,
        task_id="plaid-appliance",
        task_version=1,
        global_model_sha256="a" * 64,
        update_sha256=hashlib.sha256(seq.to_bytes(8, "big")).hexdigest(),
        examples=10,
        dataset_fingerprint="b" * 64,
        loss_before=0.9,
        loss_after=0.5,
        seconds=1.0,
        seq=seq,
        device_time_ms=NOW,
        round_nonce="c" * 32,
    )
    return Leaf(LeafKind.CONTRIBUTION, report.seal(device)).encode()


def settled_job(
    folder: Path, key: SignerKey, members: int, contributions: int, others: int = 0
) -> tuple[LedgerStore, Path, int]:
    ledger = LedgerStore.open(folder / "ledger.sqlite", key)
    device = SignerKey.generate("dev-bench")
    for start in range(0, others, 10_000):  # earlier jobs' runs: the rest of a MID's log
        ledger.append(
            [contribution(device, seq + 1, RUN + 1 + seq % 50) for seq in range(start, min(start + 10_000, others))]
        )
    for start in range(0, contributions, 10_000):
        ledger.append([contribution(device, seq + 1) for seq in range(start, min(start + 10_000, contributions))])
    arrays = {"w": np.random.default_rng(0).random((256, 256)).astype(np.float32)}
    model = folder / "final-model.npz"
    np.savez(model, **arrays)  # type: ignore[arg-type]
    digest = arrays_sha256(arrays)
    ids = [f"m{i:06d}" for i in range(members)]
    job = JobLogRecord(
        job_id="job-bench",
        run_id=RUN,
        task_id="plaid-appliance",
        task_version=1,
        purpose="research",
        buyer="acme",
        status="completed",
        rounds=2,
        rounds_completed=2,
        started_ms=NOW,
        ended_ms=NOW + 1,
        devices=tuple(
            JobDeviceEntry(device=f"d{m}", member=m, node_id=i + 1, selected=True) for i, m in enumerate(ids)
        ),
        final_model_sha256=digest,
        model_version=model_version("job-bench", digest),
        attribution=tuple(
            MemberValue(member=m, value_units=100 + i, rounds=2, excluded_rounds=0) for i, m in enumerate(ids)
        ),
    )
    ledger.append_leaves([Leaf(LeafKind.JOB, job.canonical_json())])
    index = settle_logged_job(ledger, job, 10**9, currency="EUR", created_ms=NOW + 2, policy=POLICY)
    return ledger, model, index


def best_ms(action: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--contributions", type=int, default=5000)
    parser.add_argument("--others", type=int, default=0, help="contribution leaves of other runs, logged before")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    key = SignerKey.generate("midgate/bench")
    with tempfile.TemporaryDirectory() as tmp:
        ledger, model, index = settled_job(Path(tmp), key, args.members, args.contributions, args.others)
        log_index = LogIndex(Path(tmp) / "log-index.sqlite")
        spec = REGISTRY[("plaid-appliance", 1)]
        terms = PurposeTerms(
            code="research", dpv="dpv:ResearchAndDevelopment", licence="research only", policy_version=1
        )

        def build() -> bytes:
            return build_manifest(
                ledger, "job-bench", mid="bench", mid_key=key, model_path=model, spec=spec, purpose=terms, now_ms=NOW
            )

        def indexed() -> bytes:
            return build_manifest(
                ledger,
                "job-bench",
                mid="bench",
                mid_key=key,
                model_path=model,
                spec=spec,
                purpose=terms,
                now_ms=NOW,
                index=log_index,
            )

        envelope = build()
        start = time.perf_counter()
        log_index.update(ledger)  # once per log: later updates read only the leaves appended since
        index_ms = (time.perf_counter() - start) * 1000
        assert indexed() == envelope
        indexed_ms = best_ms(indexed, args.repeats)
        receipt = ledger.receipt(index)
        leaf = ledger.leaf(index)
        build_ms = best_ms(build, args.repeats)
        verify_ms = best_ms(lambda: verify_manifest(envelope, model, key.verifier), args.repeats)
        receipt_ms = best_ms(lambda: verify_receipt(receipt, leaf, key.verifier), args.repeats)
        model_bytes = model.stat().st_size
        log_index.close()
        ledger.close()
    print(
        f"members {args.members}, contributions {args.contributions}, log {args.others + args.contributions + 2}"
        f" leaves, manifest"
        f" {len(envelope):,} bytes, model {model_bytes:,} bytes"
    )
    print(f"build by scan {build_ms:.1f} ms; indexing the log once {index_ms:.0f} ms, then build {indexed_ms:.1f} ms")
    print(f"build {build_ms:.1f} ms; verify {verify_ms:.1f} ms; receipt alone {receipt_ms:.2f} ms")
    print(f"verify / receipt alone: {verify_ms / receipt_ms:.0f}x")


if __name__ == "__main__":
    main()
