"""Crash safety: a real child process appending batches is killed with SIGKILL at random moments, many times.

After every kill the ledger must reopen, pass the full audit, and hold every batch whose `append` call returned in
the child (the child reports each returned batch on its stdout pipe, flushed right after the call returns).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.ledger.audit import audit_ledger
from coordinator.ledger.store import LedgerStore
from protocol.identity import SignerKey, save_signer_key

ITERATIONS = 30

CHILD = r"""
import sys
from pathlib import Path
from coordinator.ledger.store import LedgerStore
from protocol.identity import load_signer_key

path, key_path, run = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
store = LedgerStore.open(path, load_signer_key(key_path))
print("ready", store.size, flush=True)
batch = 0
while True:
    count = 1 + (run * 7 + batch) % 40
    result = store.append([f"run {run} batch {batch} leaf {i}".encode() * 3 for i in range(count)])
    # One write per line: print() with several arguments writes them piecewise, and a SIGKILL between two pieces
    # would leave half an acknowledgement in the pipe.
    sys.stdout.write(f"acked {run} {batch} {result.first_index} {result.count}\n")
    sys.stdout.flush()
    batch += 1
"""


def _expected(run: int, batch: int, i: int) -> bytes:
    return f"run {run} batch {batch} leaf {i}".encode() * 3


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line and time.monotonic() > deadline:
        raise TimeoutError("child gave no output")
    return line


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_acknowledged_batch(tmp_path: Path) -> None:
    key = SignerKey.generate("mid.example/ledger")
    key_path = tmp_path / "log.key"
    save_signer_key(key_path, key)
    ledger = tmp_path / "ledger.db"
    rng = random.Random(20261126)
    acked: list[tuple[int, int, int, int]] = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    kills_mid_run = 0
    for run in range(ITERATIONS):
        log_path = tmp_path / f"child-{run}.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(ledger), str(key_path), str(run)],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        try:
            deadline = time.monotonic() + 30
            first = _read_line(proc, deadline)
            assert first.startswith("ready"), log_path.read_text()
            # Kill after a random number of acknowledged batches plus a random extra delay, so the kill lands
            # anywhere: between batches, inside a transaction, during an fsync.
            for _ in range(rng.randrange(0, 6)):
                line = _read_line(proc, deadline)
                assert line.startswith("acked"), log_path.read_text()
                acked.append(_parse_ack(line))
            busy_until = time.monotonic() + rng.uniform(0, 0.02)
            while time.monotonic() < busy_until:
                pass
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.stdout is not None
            # Only whole lines are acknowledgements; a line cut by the kill was never fully reported.
            for line in proc.stdout.read().split("\n")[:-1]:
                if line.startswith("acked"):
                    acked.append(_parse_ack(line))
            kills_mid_run += proc.returncode == -signal.SIGKILL
        except BaseException:
            print(log_path.read_text())
            raise
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()

        report = audit_ledger(ledger, key.verifier)
        with LedgerStore.open(ledger, key) as store:
            assert store.size == report.size
            for ack_run, batch, first, count in acked:
                assert first + count <= store.size, f"acknowledged batch {ack_run}/{batch} lost"
                for i, (index, data) in enumerate(store.leaves(first, first + count)):
                    assert (index, data) == (first + i, _expected(ack_run, batch, i))
    assert kills_mid_run == ITERATIONS
    assert len(acked) > ITERATIONS  # the test did exercise appends that returned


def _parse_ack(line: str) -> tuple[int, int, int, int]:
    _, run, batch, first, count = line.split()
    return int(run), int(batch), int(first), int(count)
