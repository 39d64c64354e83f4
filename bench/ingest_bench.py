"""Ingest cost, throughput, publish->receipt latency and idle agent memory, on real processes.

Setup: a real Mosquitto (persistence on) and `midgate coordinator serve` (ledger and dedup index with
synchronous=FULL, batched commits) on loopback; N publisher processes, each one enrolled device whose reports are
signed *before* the timed phase, publish QoS 1 and count the receipts that come back on their down topic.

Figures (baseline measured in the same run):
- coordinator CPU seconds per accepted report (psutil, user+system of the coordinator process from the moment the
  publishers start publishing to the last receipt), shown as a multiple of one raw Ed25519 verification with
  pyca/cryptography (the library ingest verifies with; CPU time, the smallest of several measurements in the run) --
  target <= 2x. The saturated phase runs `--rounds` times on the same stack, each with devices of its own; every
  round is printed and the median is the figure: one round is 4-6 s of traffic, and rounds of one run on one stack
  differ by several percent;
- per round, the CPU of the event-loop thread (the MQTT client and the batch loop) and of the other threads (the
  pipeline's worker threads), what the broker delivered (received, duplicates: a redelivery would be screened and
  verified again and cost CPU without an accepted report), and a probe process's timing of raw verifications and of
  a Python reference workload during the round against just before it: the machine's own speed moves (other tenants
  of the host, caches shared with the publishers), and the probe shows by how much and for which kind of work;
- sustained accepted reports/s over the saturated phase (median of the rounds);
- publish -> receipt-arrival latency p50/p99 with one publisher paced at 1,000 reports/s -- target p99 < 100 ms;
- resident memory of an idle `midgate agent run` (enrolled, connected, no training) -- target < 80 MB.

Run: .venv/bin/python bench/ingest_bench.py [--publishers 3] [--reports 6000] [--rounds 3] [--rate 1000] [--seconds 5]

Scale-out mode, `--workers K`: the saturated phase only, once with the single `serve` process and then with 1..K
screening workers (`coordinator ingest-worker`, MQTT 5 shared subscription) in front of `serve` as sequencer, each on
a fresh stack; reports total coordinator CPU (sequencer + workers) and the sequencer's own CPU per accepted report
against the same raw-verify baseline, and the sustained reports/s. Publishers share the same 2 cores.

    .venv/bin/python bench/ingest_bench.py --workers 2 [--publishers 3] [--reports 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

if TYPE_CHECKING:
    from protocol.messages import ContributionReport

MID = "benchmid"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _report(i: int, device: str, seq: int, now_ms: int) -> ContributionReport:
    from mqtt_fixtures import contribution_report

    return contribution_report(i, device, seq, now_ms)


# --- publisher process ---------------------------------------------------------------------------------------------


def publisher_main(args: argparse.Namespace) -> None:
    """Sign `reports` reports, then publish them (as fast as possible, or paced at `rate`/s); write timings as JSON."""
    import base64

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.identity import SignerKey
    from protocol.topics import DownKind, UpKind, down_topic, up_topic

    key = SignerKey.parse(Path(args.key_file).read_text())
    device = args.device
    now = int(time.time() * 1000)
    envelopes = [_report(i, device, i + 1, now).seal(key) for i in range(args.reports)]
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    done = threading.Event()
    lock = threading.Lock()

    def on_message(client: object, userdata: object, message: paho.MQTTMessage) -> None:
        # A ReceiptBatch (one message per device per ledger batch; timing only, the agent is what verifies), or the
        # echo consumer's reply, which is the report envelope itself.
        doc = json.loads(message.payload)
        if "receipts" in doc:
            seqs = [int(entry["seq"]) for entry in doc["receipts"]]
        else:
            seqs = [int(json.loads(base64.b64decode(doc["payload"]))["seq"])]
        arrived = time.perf_counter()
        with lock:
            for seq in seqs:
                start = sent_at.pop(seq, None)
                if start is not None:
                    latencies.append(arrived - start)
            if len(latencies) == args.reports:
                done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{device}", protocol=paho.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_message = on_message
    client.connect("127.0.0.1", args.port)
    client.subscribe(down_topic(MID, device, DownKind.RECEIPT), qos=1)
    client.loop_start()
    time.sleep(0.5)
    Path(args.ready_file).write_text("ready")
    while not Path(args.go_file).exists():
        time.sleep(0.01)
    topic = up_topic(MID, device, UpKind.REPORT)
    t0 = time.perf_counter()
    interval = 1.0 / args.rate if args.rate else 0.0
    for i, envelope in enumerate(envelopes):
        if interval:
            target = t0 + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        with lock:
            sent_at[i + 1] = time.perf_counter()
        client.publish(topic, envelope, qos=1)
    done.wait(120)
    t1 = time.perf_counter()
    client.loop_stop()
    client.disconnect()
    Path(args.out).write_text(json.dumps({"latencies": latencies, "seconds": t1 - t0, "sent": len(envelopes)}))


def echo_main(args: argparse.Namespace) -> None:
    """The MQTT floor: a bare paho subscriber that acks each report by hand and publishes one reply to its device,
    with no verification, storage or signing. Its CPU per message is what any paho-based ingest pays first."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        device = message.topic.split("/")[3]
        client.publish(f"mid/{MID}/dev/{device}/down/receipt", message.payload, qos=1)
        client.ack(message.mid, message.qos)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-echo", protocol=paho.MQTTv5, manual_ack=True)
    client.max_inflight_messages_set(0)
    client.max_queued_messages_set(0)
    client.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client.connect("127.0.0.1", args.port, properties=props)
    client.subscribe(f"mid/{MID}/dev/+/up/+", qos=1)
    Path(args.ready_file).write_text("ready")
    client.loop_forever()


# --- probe process: the machine's speed while the coordinator runs --------------------------------------------------

PROBE_EVERY_S = 0.5
"""A probe sample every half second costs about 2 ms of CPU: under half a percent of one core."""


def python_reference_us(samples: int = 20) -> float:
    """CPU time of one pass of interpreter-bound work like ingest's own (JSON parse and canonical re-encode of a
    report payload, a dict and a few objects): a yardstick for how fast Python code runs at the moment."""
    payload = _report(7, "d-probe", 1, 1_790_000_000_000).canonical_json()
    t = time.process_time()
    for i in range(samples):
        doc = json.loads(payload)
        doc["seq"] = str(i)
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        _ = {key: len(value) for key, value in doc.items() if isinstance(value, str)}, text.encode()
    return (time.process_time() - t) / samples * 1e6


def probe_main(args: argparse.Namespace) -> None:
    """Until SIGTERM: every PROBE_EVERY_S, time a few raw verifications and `python_reference_us`; then write the
    medians as JSON. Run during a saturated round, it shows whether the machine itself ran slower than when the
    baseline was measured (other tenants of the host, our own processes sharing caches) and for which kind of work."""
    from protocol.identity import SignerKey

    key = SignerKey.generate("probe")
    message = b"x" * 600
    sig = key._sign(message)
    verifier = key.verifier
    verify: list[float] = []
    python: list[float] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(PROBE_EVERY_S):
        t = time.process_time()
        for _ in range(10):
            verifier.verifies(message, sig)
        verify.append((time.process_time() - t) / 10 * 1e6)
        python.append(python_reference_us())
    Path(args.out).write_text(
        json.dumps(
            {
                "verify_us": statistics.median(verify or [0.0]),
                "python_us": statistics.median(python or [0.0]),
                "samples": len(verify),
            }
        )
    )


# --- orchestration -------------------------------------------------------------------------------------------------


def raw_verify_us(samples: int = 3000) -> float:
    """CPU time (not wall time: this machine is shared) of one verification, best of three runs."""
    from protocol.identity import SignerKey

    key = SignerKey.generate("bench")
    message = b"x" * 600
    sig = key._sign(message)
    verifier = key.verifier
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        for _ in range(samples):
            verifier.verifies(message, sig)
        best = min(best, (time.process_time() - t) / samples)
    return best * 1e6


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


class Stack:
    def __init__(self, root: Path, extra: str = "") -> None:
        from mqtt_fixtures import MosquittoProcess, basic_config, coordinator_toml

        self.root = root
        self.broker_port = _free_port()
        self.http_port = _free_port()
        self.broker = MosquittoProcess(root / "mosquitto", basic_config(root / "mosquitto", self.broker_port), 0)
        self.broker.port = self.broker_port
        self.data = root / "coordinator"
        self.config = root / "coordinator.toml"
        self.config.write_text(coordinator_toml(self.data, MID, self.broker_port, self.http_port, extra))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        from mqtt_fixtures import PYTHON, http_ready, wait_until

        log = (self.root / "coordinator.log").open("ab")
        proc = subprocess.Popen(
            [PYTHON, "-c", "from midgate_cli import app; app()", "coordinator", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.procs.append(proc)
        wait_until(lambda: http_ready(self.http_port), 60, "coordinator HTTP")
        return proc

    def start_worker(self, worker_id: str) -> subprocess.Popen[bytes]:
        from mqtt_fixtures import PYTHON, wait_until

        log_path = self.root / f"worker-{worker_id}.log"
        log = log_path.open("ab")
        cmd = [PYTHON, "-c", "from midgate_cli import app; app()", "coordinator", "ingest-worker"]
        cmd += ["--config", str(self.config), "--worker-id", worker_id]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs.append(proc)
        wait_until(lambda: log_path.read_text().count("connected to broker") >= 2, 60, f"worker {worker_id}")
        return proc

    def enrol_device(self, name: str) -> tuple[str, Path]:
        """Register a device directly in the registry (as an enrolment would) and write its key for a publisher."""
        from coordinator.registry.store import Registry
        from protocol.identity import SignerKey, save_signer_key

        device = f"d-{name}"
        key = SignerKey.generate(device)
        registry = Registry(self.data / "registry.sqlite")
        now = int(time.time() * 1000)
        registry.add_invite(f"inv-{name}", f"m-{name}", now, now + 60_000)
        registry.redeem_invite(f"inv-{name}", now, device, key.verifier, "$7$101$unused$unused")
        registry.close()
        path = self.root / f"{device}.key"
        save_signer_key(path, key)
        return device, path

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        self.broker.stop()


def run_publishers(
    stack: Stack,
    devices: list[tuple[str, Path]],
    reports: int,
    rate: int,
    at_go: Callable[[], None] | None = None,
) -> list[dict[str, object]]:
    """Start one publisher process per device, let them sign and connect, then start them together. `at_go` runs
    just before the start: a CPU window opened there leaves out the seconds the publishers spend signing."""
    from mqtt_fixtures import wait_until

    go = stack.root / f"go-{time.monotonic_ns()}"
    procs, outs, readies = [], [], []
    for device, key_file in devices:
        out = stack.root / f"{device}-{rate}.json"
        ready = stack.root / f"{device}-{rate}.ready"
        cmd = [sys.executable, __file__, "--publisher", "--device", device, "--key-file", str(key_file)]
        cmd += ["--port", str(stack.broker_port), "--reports", str(reports), "--rate", str(rate)]
        cmd += ["--out", str(out), "--ready-file", str(ready), "--go-file", str(go)]
        procs.append(subprocess.Popen(cmd, cwd=REPO))
        outs.append(out)
        readies.append(ready)
    wait_until(lambda: all(r.exists() for r in readies), 120, "publishers signed and connected", poll_s=0.1)
    if at_go is not None:
        at_go()
    go.write_text("go")
    for proc in procs:
        proc.wait(180)
    return [json.loads(o.read_text()) for o in outs]


def saturated_round(stack: Stack, coordinator_pid: int, name: str, publishers: int, reports: int) -> dict[str, float]:
    """One saturated phase on a running stack, with devices of its own. CPU of the coordinator (whole process and per
    thread) from the moment the publishers start to the last receipt; a probe process samples the machine's speed."""
    import psutil

    devices = [stack.enrol_device(f"{name}p{i}") for i in range(publishers)]
    verify_before = raw_verify_us(1000)
    python_before = min(python_reference_us(200) for _ in range(3))
    coordinator = psutil.Process(coordinator_pid)
    probe_out = stack.root / f"probe-{name}.json"
    probe = subprocess.Popen([sys.executable, __file__, "--probe", "--out", str(probe_out)], cwd=REPO)
    before: dict[str, object] = {}

    def at_go() -> None:
        before["cpu"] = sum(coordinator.cpu_times()[:2])
        before["threads"] = {t.id: t.user_time + t.system_time for t in coordinator.threads()}
        before["counts"] = {m: metric(stack.http_port, m) for m in _COUNTS}

    results = run_publishers(stack, devices, reports, 0, at_go)
    cpu = sum(coordinator.cpu_times()[:2]) - float(before["cpu"])  # type: ignore[arg-type]
    threads0: dict[int, float] = before["threads"]  # type: ignore[assignment]
    loop_cpu, other_cpu = 0.0, 0.0
    for t in coordinator.threads():
        spent = t.user_time + t.system_time - threads0.get(t.id, 0.0)
        if t.id == coordinator_pid:
            loop_cpu += spent  # the main thread runs the event loop
        else:
            other_cpu += spent
    counts0: dict[str, float] = before["counts"]  # type: ignore[assignment]
    counts = {m: metric(stack.http_port, m) - counts0[m] for m in _COUNTS}
    probe.send_signal(signal.SIGTERM)
    probe.wait(30)
    during = json.loads(probe_out.read_text())
    accepted = counts["midgate_ingest_accepted_total"]
    n = max(accepted, 1.0)
    busy = max(float(r["seconds"]) for r in results)  # type: ignore[arg-type]
    return {
        "us": cpu / n * 1e6,
        "per_s": accepted / busy,
        "accepted": accepted,
        "received": counts["midgate_ingest_received_total"],
        "duplicates": counts["midgate_ingest_dedup_hits_total"],
        "receipts": float(sum(len(r["latencies"]) for r in results)),  # type: ignore[arg-type]
        "batches": counts["midgate_ingest_batch_size_count"],
        "loop_us": loop_cpu / n * 1e6,
        "other_us": other_cpu / n * 1e6,
        "verify_before_us": verify_before,
        "python_before_us": python_before,
        "verify_during_us": float(during["verify_us"]),
        "python_during_us": float(during["python_us"]),
    }


_COUNTS = (
    "midgate_ingest_accepted_total",
    "midgate_ingest_received_total",
    "midgate_ingest_dedup_hits_total",
    "midgate_ingest_batch_size_count",
)


def print_rounds(rounds: list[dict[str, float]], verify_us: float) -> None:
    for i, r in enumerate(rounds, 1):
        print(
            f"  round {i}: coordinator CPU {r['us']:6.1f} us per accepted report"
            f" = {r['us'] / verify_us:.2f}x raw verify;"
            f" {r['per_s']:5.0f} reports/s; accepted {int(r['accepted'])}, received {int(r['received'])},"
            f" duplicates {int(r['duplicates'])}, receipts back {int(r['receipts'])},"
            f" {r['accepted'] / max(r['batches'], 1):.0f} per ledger batch"
        )
        print(
            f"           loop thread (MQTT client, batch loop) {r['loop_us']:.1f} us,"
            f" other threads (pipeline) {r['other_us']:.1f} us;"
            f" probe during / before the round: verify {r['verify_during_us']:.1f} / {r['verify_before_us']:.1f} us"
            f" ({r['verify_during_us'] / r['verify_before_us']:.2f}x), Python reference"
            f" {r['python_during_us']:.1f} / {r['python_before_us']:.1f} us"
            f" ({r['python_during_us'] / r['python_before_us']:.2f}x)"
        )
    median = statistics.median(r["us"] for r in rounds)
    print(
        f"  coordinator CPU per accepted report, median of {len(rounds)} rounds: {median:8.1f} us"
        f"  = {median / verify_us:.2f}x raw verify (target <= 2x)"
    )
    print(
        f"  sustained: {statistics.median(r['per_s'] for r in rounds):8.0f} reports/s"
        " (median of the rounds; first publish to last receipt)"
    )


def idle_agent_rss_mb(stack: Stack) -> float:
    import psutil
    from mqtt_fixtures import PYTHON, agent_toml

    from coordinator.enrolment.enroller import issue_invite
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.registry.store import Registry
    from edge.agent.config import AgentSettings
    from edge.agent.enrolment import enrol

    key = load_or_create_mid_key(stack.data / "mid.key", MID)
    registry = Registry(stack.data / "registry.sqlite")
    token = issue_invite(registry, key, MID, "idle-member", int(time.time() * 1000), 600)
    registry.close()
    agent_dir = stack.root / "agent"
    agent_dir.mkdir()
    config = agent_dir / "agent.toml"
    config.write_text(agent_toml(agent_dir / "data"))
    enrol(AgentSettings.load(config), f"http://127.0.0.1:{stack.http_port}", token)
    log = (agent_dir / "agent.log").open("ab")
    proc = subprocess.Popen(
        [PYTHON, "-c", "from midgate_cli import app; app()", "agent", "run", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    stack.procs.append(proc)
    time.sleep(6)  # a benchmark, not a test: let it connect, subscribe and send a heartbeat
    return float(psutil.Process(proc.pid).memory_info().rss) / 2**20


def mqtt_floor_us(stack: Stack, publishers: int, reports: int) -> float:
    """CPU per message of the bare paho echo consumer, fed by the same publishers (the coordinator is stopped)."""
    import psutil
    from mqtt_fixtures import wait_until

    for proc in stack.procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(15)
    ready = stack.root / "echo.ready"
    cmd = [sys.executable, __file__, "--echo", "--port", str(stack.broker_port), "--ready-file", str(ready)]
    echo = subprocess.Popen(cmd, cwd=REPO)
    stack.procs.append(echo)
    wait_until(ready.exists, 60, "echo consumer")
    time.sleep(0.5)
    pe = psutil.Process(echo.pid)
    cpu0 = sum(pe.cpu_times()[:2])
    devices = [stack.enrol_device(f"e{i}") for i in range(publishers)]
    results = run_publishers(stack, devices, reports, 0)
    cpu = sum(pe.cpu_times()[:2]) - cpu0
    replies = sum(len(r["latencies"]) for r in results)  # type: ignore[arg-type]
    return cpu / max(replies, 1) * 1e6


def saturated_run(workers: int, publishers: int, reports: int) -> dict[str, float]:
    """One fresh stack: `serve` alone (workers=0) or as sequencer behind `workers` screening workers."""
    import psutil

    root = Path(tempfile.mkdtemp(prefix=f"ingest-bench-w{workers}-"))
    stack = Stack(root, f"workers = {workers}" if workers else "")
    try:
        stack.broker.start()
        sequencer = stack.start_coordinator()
        worker_procs = [stack.start_worker(f"w{i + 1}") for i in range(workers)]
        devices = [stack.enrol_device(f"p{i}") for i in range(publishers)]
        watched = [psutil.Process(p.pid) for p in [sequencer, *worker_procs]]
        accepted0 = metric(stack.http_port, "midgate_ingest_accepted_total")
        cpu0 = [sum(p.cpu_times()[:2]) for p in watched]
        results = run_publishers(stack, devices, reports, 0)
        cpu = [sum(p.cpu_times()[:2]) - c for p, c in zip(watched, cpu0, strict=True)]
        accepted = metric(stack.http_port, "midgate_ingest_accepted_total") - accepted0
        busy = max(float(r["seconds"]) for r in results)  # type: ignore[arg-type]
        n = max(accepted, 1.0)
        return {
            "accepted": accepted,
            "sent": float(publishers * reports),
            "total_us": sum(cpu) / n * 1e6,
            "sequencer_us": cpu[0] / n * 1e6,
            "worker_us": sum(cpu[1:]) / n * 1e6,
            "per_s": accepted / busy,
        }
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


def workers_main(args: argparse.Namespace) -> None:
    verify_before_us = raw_verify_us()
    runs = {k: saturated_run(k, args.publishers, args.reports) for k in range(args.workers + 1)}
    verify_us = min(verify_before_us, raw_verify_us())
    print(f"ingest scale-out bench ({args.publishers} publishers x {args.reports} pre-signed reports, QoS 1, loopback)")
    print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared with publishers)")
    print(f"  raw Ed25519 verify (pyca/cryptography, CPU time, baseline): {verify_us:.1f} us")
    base = runs[0]
    for k, r in runs.items():
        name = "serve alone (baseline)" if k == 0 else f"{k} worker(s) + sequencer"
        print(
            f"  {name:26s} accepted {int(r['accepted'])}/{int(r['sent'])}: total CPU {r['total_us']:6.1f} us/report"
            f" = {r['total_us'] / verify_us:.2f}x verify (sequencer {r['sequencer_us']:6.1f} us"
            f" = {r['sequencer_us'] / verify_us:.2f}x, workers {r['worker_us']:6.1f} us);"
            f" {r['per_s']:6.0f} reports/s = {r['per_s'] / base['per_s']:.2f}x serve alone"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--publisher", action="store_true")
    parser.add_argument("--echo", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--key-file")
    parser.add_argument("--port", type=int)
    parser.add_argument("--out")
    parser.add_argument("--ready-file")
    parser.add_argument("--go-file")
    parser.add_argument("--publishers", type=int, default=3)
    parser.add_argument("--reports", type=int, default=6000, help="reports per publisher in the saturated phase")
    parser.add_argument("--rate", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=3, help="saturated phases on the same stack; the median is the figure"
    )
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--latency-rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the paced latency phase")
    parser.add_argument("--workers", type=int, default=0, help="scale-out mode: compare serve alone with 1..K workers")
    args = parser.parse_args()
    if args.publisher:
        publisher_main(args)
        return
    if args.echo:
        echo_main(args)
        return
    if args.probe:
        probe_main(args)
        return
    if args.workers:
        workers_main(args)
        return

    verify_before_us = raw_verify_us()
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    stack = Stack(root)
    try:
        stack.broker.start()
        coordinator = stack.start_coordinator()
        rounds = [
            saturated_round(stack, coordinator.pid, f"r{r}", args.publishers, args.reports) for r in range(args.rounds)
        ]

        latency_device = [stack.enrol_device("lat")]
        paced = run_publishers(stack, latency_device, int(args.latency_rate * args.seconds), args.latency_rate)[0]
        lat = sorted(paced["latencies"])  # type: ignore[type-var]
        p50 = statistics.median(lat) * 1e3
        p99 = lat[int(0.99 * (len(lat) - 1))] * 1e3

        rss = idle_agent_rss_mb(stack)
        echo_us = mqtt_floor_us(stack, args.publishers, args.reports)
        verify_us = min(verify_before_us, raw_verify_us(), *(r["verify_before_us"] for r in rounds))
        print(f"ingest bench ({args.publishers} publishers x {args.reports} pre-signed reports, QoS 1, loopback)")
        print(f"  load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine)")
        print(f"  raw Ed25519 verify (pyca/cryptography, CPU time, baseline): {verify_us:8.1f} us")
        print(
            f"  MQTT floor (bare paho: receive, manual ack, publish reply): {echo_us:8.1f} us/message"
            f"  = {echo_us / verify_us:.2f}x raw verify"
        )
        print_rounds(rounds, verify_us)
        print(
            f"  latency at {args.latency_rate}/s for {args.seconds:.0f}s ({len(lat)} receipts): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms (target p99 < 100 ms)"
        )
        print(f"  idle agent RSS: {rss:.1f} MB (target < 80 MB)")
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
