"""Protocol throughput: sign, verify, seal, open and open+decode rates next to raw pyca Ed25519 verify.

Baseline: `Ed25519PublicKey.verify` of pyca/cryptography on the very bytes an envelope signs (the PAE of a typical
contribution report), measured in the same run. The envelope open path adds JSON, base64, key lookup and PAE on top
of one verify; the target is open / raw_verify >= 0.85.

    .venv/bin/python bench/protocol_bench.py [--seconds 0.2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.envelope import KeyRing, decode, open_envelope, pae
from protocol.identity import SignerKey
from protocol.messages import ContributionReport, DpParams

TARGET = 0.85


def sample_report() -> ContributionReport:
    return ContributionReport(
        run_id=2**63 + 11,
        round=3,
        node_id=2**62 + 5,
        seq=123_456,
        device_time_ms=1_800_000_000_000,
        task_id="har-cnn",
        task_version=1,
        round_nonce="0f" * 16,
        global_model_sha256="ab" * 32,
        update_sha256="cd" * 32,
        examples=512,
        dataset_fingerprint="ef" * 32,
        loss_before=1.25,
        loss_after=0.75,
        seconds=12.5,
        dp=DpParams(clipping_norm=1.0, noise_multiplier=0.5),
    )


def calibrate(fn: Callable[[], object]) -> int:
    """A batch size that takes >= 10 ms, so timer overhead is noise."""
    batch = 1
    while True:
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        if time.perf_counter() - start >= 0.01:
            return batch
        batch *= 2


def measure(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Operations per CPU-second of this process over one slice of about `seconds` of CPU time.

    CPU time, not wall time: the machine is shared, and time spent runnable but descheduled would count against
    whichever operation happened to be running, skewing the ratios."""
    done, start = 0, time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        for _ in range(batch):
            fn()
        done += batch
    return done / elapsed


def rates(cases: list[tuple[str, Callable[[], object]]], seconds: float, repeats: int) -> dict[str, float]:
    """Best slice per case. Slices of all cases interleave, so load from other processes on this shared machine hits
    the baseline and the measured paths alike, and the best slice of each is the least disturbed one."""
    batches = {name: calibrate(fn) for name, fn in cases}
    best = dict.fromkeys(batches, 0.0)
    for _ in range(repeats):
        for name, fn in cases:
            best[name] = max(best[name], measure(fn, batches[name], seconds))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.2, help="duration of one slice (default 0.2)")
    parser.add_argument("--repeats", type=int, default=20, help="slices per operation; best counts (default 20)")
    args = parser.parse_args()

    key = SignerKey.generate("device-bench")
    ring = KeyRing([key.verifier])
    report = sample_report()
    payload = report.canonical_json()
    kind = ContributionReport.PAYLOAD_TYPE
    envelope = report.seal(key)
    message = pae(kind, payload)
    raw_private = Ed25519PrivateKey.generate()
    raw_public = raw_private.public_key()
    raw_signature = raw_private.sign(message)
    signature = key._sign(message)

    cases: list[tuple[str, Callable[[], object]]] = [
        ("raw pyca verify (baseline)", lambda: raw_public.verify(raw_signature, message)),
        ("sign (SignerKey)", lambda: key._sign(message)),
        ("verify (VerifierKey.verifies)", lambda: key.verifier.verifies(message, signature)),
        ("seal (report, incl. canonical JSON)", lambda: report.seal(key)),
        ("open_envelope", lambda: open_envelope(envelope, ring, kind)),
        ("open_envelope + decode", lambda: decode(open_envelope(envelope, ring, kind), ContributionReport)),
    ]
    results = rates(cases, args.seconds, args.repeats)
    baseline = results["raw pyca verify (baseline)"]

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    print(f"envelope {len(envelope)} B, payload {len(payload)} B")
    print(f"best of {args.repeats} interleaved slices of {args.seconds}s CPU time per operation; rates per CPU-second")
    print(f"{'operation':40} {'ops/s':>10} {'us/op':>8} {'/ raw verify':>13}")
    for name, ops in results.items():
        print(f"{name:40} {ops:10.0f} {1e6 / ops:8.1f} {ops / baseline:13.3f}")
    ratio = results["open_envelope"] / baseline
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"open_envelope / raw verify = {ratio:.3f} ({verdict} the {TARGET:.2f} target)")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
