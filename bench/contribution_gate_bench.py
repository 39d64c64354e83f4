"""What the contribution cross-check (coordinator/gate/gate.py) costs the sequencer, in process.

Setup: real SQLite files (registry, ledger with synchronous=FULL, dedup index, the gate's store), real Ed25519, a real
CaptureDirectory per round; D enrolled devices with Flower nodes, each reporting every one of R rounds (signed before
the timed phase). The same reports go through the sequencer's steps in batches of 500 on a fresh data folder each:

- baseline: `screen` + `commit` (what `serve` does without `[federation] enabled`);
- checked: `screen` + `ContributionGate.admit` + `commit`, every round already captured (reports go straight on);
  each report's invitation nonce is checked against the job record `job start` would have written for the run;
- held: `screen` + `admit` with no capture yet (every report stored to wait), then the captures appear and `resolve`
  + `commit` + `logged` log them all: the path reports take when they arrive before their round is complete.

Printed: CPU seconds per report of each, and checked/held as ratios of the baseline measured in the same run.

Run: .venv/bin/python bench/contribution_gate_bench.py [--devices 50] [--rounds 40]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mqtt_fixtures import contribution_report, write_job_record  # noqa: E402

from coordinator.capture.directory import CaptureDirectory  # noqa: E402
from coordinator.capture.round import CapturedUpdate, RoundCapture  # noqa: E402
from coordinator.gate.gate import open_contribution_gate  # noqa: E402
from coordinator.ingest.pipeline import InboundMessage, IngestPipeline  # noqa: E402
from coordinator.ledger.dedup import DedupIndex  # noqa: E402
from coordinator.ledger.store import LedgerStore  # noqa: E402
from coordinator.mid_key import mid_key_name  # noqa: E402
from coordinator.registry.store import Registry  # noqa: E402
from protocol.identity import SignerKey  # noqa: E402
from protocol.tasks.arrays import arrays_sha256  # noqa: E402
from protocol.topics import UpKind, up_topic  # noqa: E402

MID = "benchmid"
NOW_MS = 1_790_000_000_000
RUN = 3
BATCH = 500


def _arrays(node: int, server_round: int) -> dict[str, np.ndarray]:
    return {"w": np.full((16, 16), float(node * 1000 + server_round), np.float32)}


GLOBAL = arrays_sha256({"w": np.zeros((16, 16), np.float32)})


class Fleet:
    """Devices, their keys and node ids, and every report they sign (made once, used by every variant)."""

    def __init__(self, devices: int, rounds: int) -> None:
        self.mid_key = SignerKey.generate(mid_key_name(MID))
        self.keys = {f"dev-{i}": SignerKey.generate(f"dev-{i}") for i in range(devices)}
        self.nodes = {device: 1000 + i for i, device in enumerate(self.keys)}
        self.nonces = {device: f"{i:032x}" for i, device in enumerate(self.keys)}
        self.rounds = rounds
        self.messages = []
        for r in range(1, rounds + 1):
            for device, key in self.keys.items():
                node = self.nodes[device]
                report = contribution_report(
                    r,
                    device,
                    r,
                    NOW_MS,
                    nonce=self.nonces[device],
                    run_id=RUN,
                    round=r,
                    node_id=node,
                    global_model_sha256=GLOBAL,
                    update_sha256=arrays_sha256(_arrays(node, r)),
                )
                envelope = report.seal(key)
                self.messages.append(InboundMessage(up_topic(MID, device, UpKind.REPORT), envelope))

    def setup(self, root: Path) -> None:
        registry = Registry(root / "registry.sqlite")
        for device, key in self.keys.items():
            registry.add_invite(f"inv-{device}", f"member-{device}", NOW_MS, NOW_MS + 10_000)
            registry.redeem_invite(f"inv-{device}", NOW_MS, device, key.verifier, "$7$101$x$y")
            registry.add_flower_node(device, self.nodes[device], f"k-{device}", NOW_MS)
        registry.close()
        write_job_record(root / "job-book", "bench-job", RUN, {d: (self.nodes[d], self.nonces[d]) for d in self.keys})

    def capture(self, root: Path) -> None:
        directory = CaptureDirectory(root / "jobs" / f"run-{RUN}")
        for r in range(1, self.rounds + 1):
            updates = tuple(
                CapturedUpdate(r, n, _arrays(n, r), arrays_sha256(_arrays(n, r)), GLOBAL, 10, 10, {})
                for n in self.nodes.values()
            )
            directory.on_round(RoundCapture(RUN, r, GLOBAL, updates, ()))


def _run(fleet: Fleet, variant: str) -> tuple[float, int]:
    """CPU seconds of the timed sequencer work and the ledger size it left."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fleet.setup(root)
        if variant == "checked":
            fleet.capture(root)
        ledger = LedgerStore.open(root / "ledger.sqlite", fleet.mid_key)
        dedup = DedupIndex(root / "ingest.sqlite")
        registry = Registry(root / "registry.sqlite")
        pipeline = IngestPipeline(MID, registry, ledger, dedup, fleet.mid_key, 65536, 1e9, 10**9)
        gate = open_contribution_gate(
            mid=MID,
            mid_key=fleet.mid_key,
            store_path=root / "contributions.sqlite",
            registry=registry,
            jobs_dir=root / "jobs",
            job_book_dir=root / "job-book",
            grace_s=3600.0,
            poll_s=0.001,
            in_ledger=lambda key_id, seq: dedup.lookup(key_id, seq) is not None,
        )
        started = time.process_time()
        for i in range(0, len(fleet.messages), BATCH):
            screened = pipeline.screen(fleet.messages[i : i + BATCH], NOW_MS)
            candidates = screened.candidates
            if variant != "baseline":
                candidates = gate.admit(candidates, NOW_MS).ready
            pipeline.commit(candidates, NOW_MS)
        cpu = time.process_time() - started
        if variant == "held":
            fleet.capture(root)  # the strategy's work, not the sequencer's: not timed
            started = time.process_time()
            while gate.pending_count:
                ready = gate.resolve(NOW_MS, limit=BATCH).ready
                gate.logged(pipeline.commit(ready, NOW_MS))
            cpu += time.process_time() - started
        size = ledger.size
        gate.close()
        registry.close()
        dedup.close()
        ledger.close()
        return cpu, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    fleet = Fleet(args.devices, args.rounds)
    n = len(fleet.messages)
    results = {}
    for variant in ("baseline", "checked", "held"):
        cpu, size = _run(fleet, variant)
        assert size == n, f"{variant}: ledger holds {size} of {n} reports"
        results[variant] = cpu
        print(f"{variant:9s} {n} reports, {cpu:.3f} CPU s, {cpu / n * 1e6:.1f} us/report")
    base = results["baseline"]
    print(f"checked/baseline = {results['checked'] / base:.3f}   held/baseline = {results['held'] / base:.3f}")


if __name__ == "__main__":
    main()
