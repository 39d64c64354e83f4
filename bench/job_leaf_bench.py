"""How large a job's JOB and ROUND leaves are when many members hold the same data, against a leaf's 1 MiB.

A job of N members holding data sets C times over (copy groups of C; the last three members a chain of two job groups
that is no set) runs through the path `serve` logs a job by: its job book record and round captures on disk,
`job_log_records`, and each round split into the ROUND leaves the ledger gets (`split_round_record`). The baseline,
computed in the same run from the same records, is the encoding before job group sets and round parts: every job
group a pair in `job_groups` and each round one leaf, whatever its size.

    .venv/bin/python bench/job_leaf_bench.py --members 1000,2000,3000 --copies 20 --rounds 8
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coordinator.capture.directory import CaptureDirectory  # noqa: E402
from coordinator.capture.round import CapturedUpdate, RoundCapture  # noqa: E402
from coordinator.federation.job import JobGroup, JobOutcome, NodeHistory, RoundAttribution, SameDataSimilarity  # noqa: E402
from coordinator.federation.job_ledger import job_log_records  # noqa: E402
from coordinator.federation.job_start import JobDevice, JobRecord, JobRequest  # noqa: E402
from protocol.job_log import JobGroupEntry, model_version, split_round_record  # noqa: E402
from protocol.leaves import MAX_SIGNED_SIZE  # noqa: E402
from protocol.tasks.arrays import arrays_sha256  # noqa: E402

RUN = 3
NODE0 = 10**19  # 64-bit Flower node ids: 20 digits


def job_record(jobs_dir: Path, members: int, copies: int, rounds: int) -> JobRecord:
    devices = [
        JobDevice(device_id=f"dev-{i:05d}", member_id=f"member-{i:05d}", node_id=NODE0 + 7919 * i)
        for i in range(members)
    ]
    ids = [str(d.node_id) for d in devices]
    copied, chain = ids[:-3], ids[-3:]
    groups = [copied[g : g + copies] for g in range(0, len(copied), copies) if len(copied) - g > 1] + [chain]
    similar = [pair for group in groups[:-1] for pair in combinations(group, 2)]
    similar += [(chain[0], chain[1]), (chain[1], chain[2])]
    rng = random.Random(members)
    values = {r: {node: rng.randrange(1, 10**9) for node in ids} for r in range(1, rounds + 1)}
    global_arrays = {"w": np.zeros(2, dtype=np.float32)}
    for r in range(1, rounds + 1):
        updates = tuple(
            CapturedUpdate(r, d.node_id, global_arrays, f"{i:064x}", arrays_sha256(global_arrays), 400, 1, {})
            for i, d in enumerate(devices)
        )
        CaptureDirectory(jobs_dir / f"run-{RUN}").on_round(
            RoundCapture(RUN, r, arrays_sha256(global_arrays), updates, ())
        )
    outcome = JobOutcome(
        run_id=RUN,
        status="finished",
        rounds_completed=rounds,
        final_model_sha256="cd" * 32,
        attribution={node: sum(values[r][node] for r in values) for node in ids},
        attribution_history={node: NodeHistory(rounds=rounds) for node in ids},
        attribution_rounds={
            r: RoundAttribution(
                method="first_order",
                values=values[r],
                groups=groups,
                same_data=[
                    SameDataSimilarity(pair=pair, similarity_milli=rng.randrange(600, 1000)) for pair in similar
                ],
            )
            for r in values
        },
        job_groups=[JobGroup(pair=pair, rounds=list(values)) for pair in similar],
    )
    request = JobRequest(
        job_id="job-bench", task_id="plaid-appliance", task_version=1, rounds=rounds, purpose="research",
        buyer="acme", validation_path=jobs_dir / "validation.npz", min_nodes=1,
    )  # fmt: skip
    return JobRecord(
        request=request, invited=devices, nonces={d.device_id: "ab" * 16 for d in devices},
        selected_node_ids=[d.node_id for d in devices], run_id=RUN, status="completed",
        flower_status="finished:completed", rounds_completed=rounds, started_ms=1_795_000_000_000,
        ended_ms=1_795_000_060_000, outcome=outcome, model_version=model_version("job-bench", "cd" * 32),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1000,2000,3000")
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    print(f"leaf limit {MAX_SIGNED_SIZE:,} bytes; copy groups of {args.copies}, {args.rounds} rounds")
    print(
        f"{'members':>7} {'job groups':>10} | {'JOB bytes':>10} {'sets':>5} {'pairs':>5} {'ROUND leaves':>12}"
        f" {'largest':>10} {'log s':>6} | {'base JOB':>10} {'base ROUND':>10} {'fits':>5} | {'JOB ratio':>9}"
    )
    for members in (int(m) for m in args.members.split(",")):
        with tempfile.TemporaryDirectory(prefix="job-leaf-bench-") as scratch:
            record = job_record(Path(scratch), members, args.copies, args.rounds)
            started = time.perf_counter()
            job, rounds = job_log_records(record, Path(scratch))
            leaves = [part for r in rounds for part in split_round_record(r)]
            seconds = time.perf_counter() - started
        job_bytes = len(job.canonical_json())
        pairs = job.job_pairs()
        baseline_job = job.model_copy(
            update={
                "job_groups": tuple(JobGroupEntry(nodes=n, members=m, rounds=r) for n, (m, r) in pairs.items()),
                "job_group_sets": (),
            }
        )
        base_job_bytes = len(baseline_job.canonical_json())
        base_round = max(len(r.canonical_json()) for r in rounds)
        fits = base_job_bytes <= MAX_SIGNED_SIZE and base_round <= MAX_SIGNED_SIZE
        ratio = job_bytes / base_job_bytes
        print(
            f"{members:>7} {len(pairs):>10,} | {job_bytes:>10,} {len(job.job_group_sets):>5} {len(job.job_groups):>5}"
            f" {len(leaves):>12} {max(len(p.canonical_json()) for p in leaves):>10,} {seconds:>6.1f} |"
            f" {base_job_bytes:>10,} {base_round:>10,} {'yes' if fits else 'no':>5} | {ratio:>9.3f}"
        )


if __name__ == "__main__":
    main()
