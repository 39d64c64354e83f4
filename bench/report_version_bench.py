"""What screening a ContributionReportV2 costs against a v1 report, in process (issue 6, drift-corrected jobs).

The ingest hook takes v1 and v2 on `up/report` in one verification: `open_envelope` accepts the set of payload
types the kind carries and the verified payloadType picks the model (coordinator/ingest/pipeline.py). The first
version of the hook opened v2 twice (1.91-1.96x v1). This measures the price on the per-report step it lands in,
`Screener.screen` (size, topic, rate, verify, signer owns topic, strict decode): real registry (SQLite), real
Ed25519, D enrolled devices, the same report fields signed once as v1 and once as v2 (with drift hashes) before the
timed phase.

Printed: CPU microseconds per report of each version, best of the interleaved repeats, and v2 as a ratio of the
baseline v1 measured in the same run.

Run: .venv/bin/python bench/report_version_bench.py [--devices 20] [--reports 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from mqtt_fixtures import contribution_fields  # noqa: E402

from coordinator.ingest.pipeline import InboundMessage, Outcome, Screener, Verdict  # noqa: E402
from coordinator.registry.store import Registry  # noqa: E402
from edge.agent.spool import build_report  # noqa: E402
from protocol.identity import SignerKey  # noqa: E402
from protocol.topics import UpKind, up_topic  # noqa: E402

MID = "benchmid"
NOW_MS = 1_790_000_000_000


def _signed(keys: list[SignerKey], reports: int, drift: bool) -> list[InboundMessage]:
    """`reports` reports of each device (`keys[d]` is `dev-d`'s key), as v2 with drift hashes when `drift`."""
    messages = []
    for d, key in enumerate(keys):
        device = f"dev-{d}"
        for seq in range(1, reports + 1):
            fields = contribution_fields(seq, device)
            if drift:
                fields["gradient_sha256"] = hashlib.sha256(b"g%d" % seq).hexdigest()
                fields["drift_offset_sha256"] = hashlib.sha256(b"o%d" % seq).hexdigest()
            envelope = build_report(fields, seq, NOW_MS).seal(key)
            messages.append(InboundMessage(up_topic(MID, device, UpKind.REPORT), envelope))
    return messages


def _screen_cpu_s(screener: Screener, messages: list[InboundMessage]) -> float:
    start = time.process_time()
    for message in messages:
        verdict = Verdict(message, Outcome.REJECTED)
        screener.screen(message, verdict, NOW_MS)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--reports", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "registry.sqlite")
        keys = [SignerKey.generate(f"dev-{d}") for d in range(args.devices)]
        for d, key in enumerate(keys):
            registry.add_invite(f"inv-{d}", f"member-{d}", NOW_MS, NOW_MS + 10_000)
            registry.redeem_invite(f"inv-{d}", NOW_MS, f"dev-{d}", key.verifier, "$7$101$x$y")
        versions = {"v1": _signed(keys, args.reports, False), "v2": _signed(keys, args.reports, True)}
        best = {name: float("inf") for name in versions}
        for _ in range(args.repeats):
            for name, messages in versions.items():
                # A fresh screener per pass: its rate buckets and heartbeat order start empty each time.
                screener = Screener(MID, registry, 1 << 20, 1e9, 10**9)
                screener.refresh_registry()
                best[name] = min(best[name], _screen_cpu_s(screener, messages) / len(messages))
        registry.close()
    count = args.devices * args.reports
    print(f"Screener.screen, {count} reports per version, best of {args.repeats} interleaved repeats (CPU time)")
    print(f"  baseline v1 report: {best['v1'] * 1e6:8.1f} us/report")
    print(f"  v2 report:          {best['v2'] * 1e6:8.1f} us/report  ({best['v2'] / best['v1']:.2f}x v1)")


if __name__ == "__main__":
    main()
