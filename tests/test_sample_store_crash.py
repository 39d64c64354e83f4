"""SIGKILL a real writer process in the middle of its batches: the store reopens clean and has lost at most the
batch that was in flight, never part of one."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge.sensors.store import SampleStore
from edge.sensors.windows import WindowSpec

REPO = Path(__file__).resolve().parents[1]
BATCH = 1000

WRITER = textwrap.dedent(
    """
    import sys
    from edge.sensors.sample import ChannelSpec, Sample
    from edge.sensors.store import SampleStore

    store = SampleStore(sys.argv[1])
    store.register("meter", (ChannelSpec("power_w", "W"),))
    batch = int(sys.argv[2])
    total = store.count()
    while True:
        store.write([Sample("meter", 1000 * (total + k), (float(total + k),)) for k in range(batch)])
        total += batch
        print(total, flush=True)
    """
)


@pytest.mark.timeout(120)
def test_sigkill_during_writes_loses_at_most_the_unflushed_batch(tmp_path: Path) -> None:
    db = tmp_path / "device.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    log = tmp_path / "writer.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for round_ in range(3):  # kill the same store three times; each reopen continues from what survived
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), str(db), str(BATCH)], stdout=subprocess.PIPE, stderr=err, env=env
            )
        try:
            reported = 0
            assert proc.stdout is not None
            while reported < (round_ + 1) * 30 * BATCH:  # poll the writer's own progress reports
                line = proc.stdout.readline()
                if not line:
                    pytest.fail(f"writer exited early with {proc.wait()}:\n{log.read_text()}")
                reported = int(line)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            # Reports printed after the one we read may still sit in the pipe; the last one is the latest commit.
            for line in proc.stdout.read().split():
                reported = int(line)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, log.read_text()

        check = sqlite3.connect(db)
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        check.close()
        with SampleStore(db) as store:
            count = store.count()
            assert reported <= count <= reported + BATCH  # at most the in-flight batch is lost (or it committed)
            assert count % BATCH == 0  # and never part of one
            windows = store.windows(WindowSpec("meter", ("power_w",), BATCH))
            values = windows.X.reshape(-1)
            np.testing.assert_array_equal(values, np.arange(count, dtype=np.float32))
