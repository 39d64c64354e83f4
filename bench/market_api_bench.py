"""The buyer job API under polling load, on real processes: request latency with 50 buyers polling, and a job's round
time with and without them (issue 18's target: rounds slowed by at most 5 %).

Setup (tests/test_market_job_e2e.py's): Mosquitto, `midgate coordinator serve` with its SuperLink and buyer API, D
enrolled `midgate agent run` daemons each replaying its share of PLAID (split by label), all on this machine. The
owner, a buyer registered like `midgate coordinator buyer add` does (the market store, from this process), requests
a job of R rounds through the API with its validation windows (PLAID test), gets it quoted, accepts it and polls
`GET /v1/jobs/{id}` every second until it is delivered. Jobs run one after the other in the same `serve`: unloaded,
then `--pairs` times loaded, unloaded (so warm-up and drift fall on both sides; each loaded job is also compared with
its two neighbours); in a loaded job 50 more registered buyers, each with a job of its own (requested, never
accepted: a buyer sees only its own jobs), poll `GET /v1/jobs/{own id}` every 0.5-1 s (uniform per buyer, staggered
starts), every request signed (protocol/buyer_request.py, a fresh nonce each), each over its own keep-alive
connection (KeepAlive: a lean client, not httpx), from the accept to the delivery; with
`--mode sse` they follow `GET /v1/jobs/{own id}/events` instead (one signed request each, the server pushes changes).

Printed, from the same run: per job its round times (the run's own `outcome.json` round_seconds, the wall time
between consecutive global models as the ServerApp measured them), their sum and the median of rounds 2..R (round 1
holds the ClientApps' start); the pollers' request latency p50/p99/max, requests per second, non-200 answers; the
owner's latency in each job; and the ratio loaded / unloaded (the means over the jobs) of the rounds' sum and of the
steady median, and each loaded job's against its two unloaded neighbours.

Run: flock /tmp/bench.lock .venv/bin/python bench/market_api_bench.py [--devices 3] [--rounds 5] [--buyers 50]
[--mode poll|sse] [--pairs 2] (about 8 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fl_stack import start_federated_coordinator, start_plaid_agents, stopping_federation  # noqa: E402
from flower_fixtures import plaid_windows  # noqa: E402
from mqtt_fixtures import MessagingStack  # noqa: E402

from coordinator.config import CoordinatorSettings  # noqa: E402
from coordinator.federation.job import JobOutcome  # noqa: E402
from coordinator.federation.job_start import JobBook  # noqa: E402
from coordinator.market.store import MarketStore  # noqa: E402
from protocol.buyer_request import sign_request  # noqa: E402
from protocol.identity import SignerKey  # noqa: E402
from protocol.tasks.windows import save_window_file  # noqa: E402

TASK = "plaid-appliance@1"
OWNER_POLL_S = 1.0


@dataclass
class Buyer:
    name: str
    key: SignerKey

    def headers(self, method: str, target: str, body: bytes = b"") -> dict[str, str]:
        return sign_request(self.key, self.name, method, target, body, time.time_ns() // 1_000_000)


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=dict)
    events: int = 0  # server-sent events received (--mode sse)

    def add(self, started: float, status: int | str) -> None:
        self.seconds.append(time.perf_counter() - started)
        if status != 200:
            self.failed[str(status)] = self.failed.get(str(status), 0) + 1

    def summary(self, wall_s: float | None = None) -> dict[str, Any]:
        s = sorted(self.seconds)
        if not s:
            return {"requests": 0}
        found: dict[str, Any] = {
            "requests": len(s),
            "p50_ms": round(1000 * s[len(s) // 2], 1),
            "p99_ms": round(1000 * s[min(len(s) - 1, int(0.99 * len(s)))], 1),
            "max_ms": round(1000 * s[-1], 1),
            "failed": self.failed,
        }
        if self.events:
            found["events"] = self.events
        if wall_s:
            found["per_s"] = round(len(s) / wall_s, 1)
        return found


async def call(client: httpx.AsyncClient, buyer: Buyer, method: str, target: str, body: Any = None) -> Any:
    data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = await client.request(method, target, content=data or None, headers=buyer.headers(method, target, data))
    if answer.status_code >= 300:
        raise SystemExit(f"{method} {target}: {answer.status_code} {answer.text}")
    return answer.json()


class KeepAlive:
    """One HTTP/1.1 keep-alive connection, GET only, answers with a Content-Length: the pollers' client. httpx cost
    this process ~8 ms CPU per request (48 s during one loaded job, 3x what `serve` used, on the cores the devices
    train on); this costs ~0.5 ms with the signing, so the rounds measure mostly the server's cost, as they would with
    buyers elsewhere."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n{lines}\r\n".encode("latin-1"))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
        except Exception:
            writer.close()
            self.streams = None
            raise
        return int(head.split(b" ", 2)[1]), body

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()


async def poller(
    base: tuple[str, int], buyer: Buyer, job_id: str, stop: asyncio.Event, into: Latencies, rng: random.Random
) -> None:
    """Poll the buyer's own job on a fixed period (0.5-1 s) from a random start, until `stop`."""
    period = rng.uniform(0.5, 1.0)
    target = f"/v1/jobs/{job_id}"
    connection = KeepAlive(*base)
    await asyncio.sleep(rng.uniform(0, period))
    due = time.monotonic()
    while not stop.is_set():
        started = time.perf_counter()
        try:
            status, _ = await connection.get(target, buyer.headers("GET", target))
            into.add(started, status)
        except (OSError, asyncio.IncompleteReadError, StopIteration, ValueError) as error:
            into.add(started, type(error).__name__)
        due += period
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    connection.close()


async def follower(
    base: tuple[str, int], buyer: Buyer, job_id: str, stop: asyncio.Event, into: Latencies, rng: random.Random
) -> None:
    """Follow the buyer's own job over server-sent events (`GET /v1/jobs/{id}/events`, one signed request) until
    `stop`; the latency is the stream's opening (to its headers), the events are counted."""
    target = f"/v1/jobs/{job_id}/events"
    await asyncio.sleep(rng.uniform(0, 1.0))
    reader, writer = await asyncio.open_connection(*base)
    lines = "".join(f"{k}: {v}\r\n" for k, v in buyer.headers("GET", target).items())
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {base[0]}\r\n{lines}\r\n".encode("latin-1"))
    started = time.perf_counter()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    into.add(started, status)
    reading = asyncio.create_task(_events_read(reader, into))
    await stop.wait()
    reading.cancel()
    writer.close()


async def _events_read(reader: asyncio.StreamReader, into: Latencies) -> None:
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.startswith(b"event: job"):
            into.events += 1


async def run_job(
    client: httpx.AsyncClient,
    owner: Buyer,
    validation: bytes,
    rounds: int,
    devices: int,
    load: list[tuple[Buyer, str]],
    serve: psutil.Process,
    mode: str,
) -> dict[str, Any]:
    """One job through the API, `load` polling beside it from the accept to the delivery; its figures, with the CPU
    seconds the `serve` process (every thread of it, not its SuperLink) and this process (the buyers' side, which on
    one machine competes with the devices for the same cores) used meanwhile."""
    spec = {"task": TASK, "purpose": "research", "rounds": rounds, "min_members": devices}
    job_id = (await call(client, owner, "POST", "/v1/jobs", spec))["job_id"]
    await call(client, owner, "POST", f"/v1/jobs/{job_id}/validation", validation)
    quoted = await call(client, owner, "POST", f"/v1/jobs/{job_id}/quote")
    accept = {"quote_sha256": quoted["quote_sha256"], "amount_minor": quoted["quote"]["total_minor"]}
    stop, polled, owned = asyncio.Event(), Latencies(), Latencies()
    rng = random.Random(18)
    await call(client, owner, "POST", f"/v1/jobs/{job_id}/accept", accept)
    started, cpu, mine = time.monotonic(), serve.cpu_times(), psutil.Process().cpu_times()
    base = (client.base_url.host, int(client.base_url.port or 80))
    watch = poller if mode == "poll" else follower
    tasks = [asyncio.create_task(watch(base, b, j, stop, polled, rng)) for b, j in load]
    target = f"/v1/jobs/{job_id}"
    state = ""
    try:
        while state not in ("delivered", "failed", "cancelled"):
            await asyncio.sleep(OWNER_POLL_S)
            at = time.perf_counter()
            answer = await client.get(target, headers=owner.headers("GET", target))
            owned.add(at, answer.status_code)
            if answer.status_code == 200:
                state = answer.json()["state"]
            if time.monotonic() - started > 600:
                raise SystemExit(f"job {job_id} not delivered in 600 s: {state}")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    wall, used, mine_used = time.monotonic() - started, serve.cpu_times(), psutil.Process().cpu_times()
    serve_cpu = used.user + used.system - cpu.user - cpu.system
    client_cpu = mine_used.user + mine_used.system - mine.user - mine.system
    if state != "delivered":
        raise SystemExit(f"job {job_id} ended {state}: {answer.json().get('reason')}")
    requests = len(polled.seconds) + len(owned.seconds)
    return {
        "job_id": job_id,
        "wall_s": wall,
        "polled": polled.summary(wall),
        "polled_seconds": polled.seconds,
        "owner": owned.summary(),
        "serve_cpu_s": round(serve_cpu, 1),
        "serve_cpu_ms_per_request": round(1000 * serve_cpu / requests, 2),
        "client_cpu_s": round(client_cpu, 1),
    }


def round_seconds(stack: MessagingStack, job_id: str) -> list[float]:
    record = JobBook(stack.data_dir / "federation" / "job-book").read(job_id)
    assert record is not None and record.run_id is not None
    outcome = JobOutcome.read(stack.data_dir / "federation" / "jobs" / f"run-{record.run_id}")
    return [outcome.round_seconds[r] for r in sorted(outcome.round_seconds)]


async def bench(
    stack: MessagingStack, devices: int, rounds: int, buyers: int, mode: str, pairs: int
) -> list[dict[str, Any]]:
    settings = CoordinatorSettings.load_for_command(stack.config)
    store = MarketStore(settings.market_path)  # what `midgate coordinator buyer add` writes; serve reads it per request
    now = time.time_ns() // 1_000_000
    owner = Buyer("owner", SignerKey.generate("owner"))
    others = [Buyer(f"poller-{i:02d}", SignerKey.generate(f"poller-{i:02d}")) for i in range(buyers)]
    for b in (owner, *others):
        store.add_buyer(b.name, b.key.verifier, now)
    store.close()
    path = stack.root / "validation.npz"
    save_window_file(path, plaid_windows("test"))
    validation = path.read_bytes()
    limits = httpx.Limits(max_connections=buyers + 10, max_keepalive_connections=buyers + 10)
    base = f"http://127.0.0.1:{stack.http_port}"
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
        spec = {"task": TASK, "purpose": "research", "rounds": rounds}
        load = [(b, (await call(client, b, "POST", "/v1/jobs", spec))["job_id"]) for b in others]
        assert stack.coordinator is not None and stack.coordinator.proc is not None
        serve = psutil.Process(stack.coordinator.proc.pid)
        results = []
        for loaded in (False, *[True, False] * pairs):
            load_avg = os.getloadavg()[0]
            result = await run_job(client, owner, validation, rounds, devices, load if loaded else [], serve, mode)
            result.update(loaded=loaded, load_before=round(load_avg, 2), load_after=round(os.getloadavg()[0], 2))
            result["round_seconds"] = round_seconds(stack, result["job_id"])
            results.append(result)
            print(json.dumps(_rounded(result)), flush=True)
    return results


def _rounded(result: dict[str, Any]) -> dict[str, Any]:
    seconds = result["round_seconds"]
    return {
        **{k: v for k, v in result.items() if k not in ("round_seconds", "polled_seconds")},
        "wall_s": round(result["wall_s"], 1),
        "round_seconds": [round(s, 2) for s in seconds],
        "rounds_s": round(sum(seconds), 2),
        "steady_s": round(_steady(seconds), 2),
    }


def _steady(seconds: list[float]) -> float:
    return statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--buyers", type=int, default=50)
    parser.add_argument(
        "--pairs", type=int, default=2, help="loaded jobs, each followed by an unloaded one (after a first unloaded)"
    )
    parser.add_argument(
        "--mode", choices=("poll", "sse"), default="poll", help="the 50 buyers poll, or follow server-sent events"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-market-api-") as tmp:
        stack = MessagingStack(Path(tmp))
        failed = True
        try:
            start_federated_coordinator(stack, "[royalties]\nfee_bps = 2000\n[market]\njoin_timeout_s = 60")
            agents = start_plaid_agents(stack, args.devices)
            with stopping_federation(stack, agents):
                results = asyncio.run(bench(stack, args.devices, args.rounds, args.buyers, args.mode, args.pairs))
            failed = False
        finally:
            stack.close(failed=failed)
    base = [r for r in results if not r["loaded"]]
    loaded = [r for r in results if r["loaded"]]
    base_sums = [sum(r["round_seconds"]) for r in base]
    loaded_sums = [sum(r["round_seconds"]) for r in loaded]
    base_steady = statistics.mean(_steady(r["round_seconds"]) for r in base)
    loaded_steady = statistics.mean(_steady(r["round_seconds"]) for r in loaded)
    latency = Latencies()
    for r in loaded:
        latency.seconds += r["polled_seconds"]
    print(
        json.dumps(
            {
                "devices": args.devices,
                "rounds": args.rounds,
                "buyers": args.buyers,
                "mode": args.mode,
                "latency_loaded": latency.summary(),
                "rounds_s_unloaded": [round(x, 2) for x in base_sums],
                "rounds_s_loaded": [round(x, 2) for x in loaded_sums],
                "ratio_rounds": round(statistics.mean(loaded_sums) / statistics.mean(base_sums), 3),
                # Each loaded job against the mean of the unloaded jobs just before and after it: drift cancels.
                "ratio_rounds_neighbours": [
                    round(loaded_sums[i] / statistics.mean(base_sums[i : i + 2]), 3) for i in range(len(loaded))
                ],
                "ratio_steady": round(loaded_steady / base_steady, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
