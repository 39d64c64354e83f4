"""The agent outbox on a real SQLite file: seqs never repeat across reopen, the disk bound holds, receipts settle."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.agent.ledger_view import SettledReport
from edge.agent.outbox import Outbox, OutboxFullError


def _signer(tag: bytes = b"x", size: int = 100):  # type: ignore[no-untyped-def]
    return lambda seq: tag * size + str(seq).encode()


def test_seq_is_strictly_increasing_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path, 1 << 20)
    seqs = [box.enqueue("report", _signer(), 1) for _ in range(3)]
    beat = box.next_ephemeral_seq()
    box.close()
    box = Outbox(path, 1 << 20)
    after = box.enqueue_many([("report", _signer(), "f1.json"), ("report", _signer(), "f2.json")], 2)
    assert seqs == [1, 2, 3] and beat == 4 and [s for _, s in after] == [5, 6]
    assert box.knows_spool_name("f1.json") and not box.knows_spool_name("f3.json")


def test_disk_bound_takes_what_fits_and_then_refuses(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", 1000)
    taken = box.enqueue_many([("report", _signer(size=300), f"f{i}.json") for i in range(5)], 1)
    assert len(taken) == 3 and box.pending_bytes <= 1000
    with pytest.raises(OutboxFullError):
        box.enqueue_many([("report", _signer(size=300), "g.json")], 1)
    assert box.usage().pending == 3


def test_settle_moves_reports_out_and_keeps_spool_names(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", 1 << 20)
    box.enqueue_many([("report", _signer(), "a.json"), ("report", _signer(), "b.json")], 1)
    assert box.settle([SettledReport(1, 10, 11, "00" * 32), SettledReport(99, 1, 1, "00" * 32)], 5) == 1
    assert box.usage().pending == 1 and box.usage().receipted == 1
    assert box.knows_spool_name("a.json")
    assert [r.seq for r in box.due(0, 10)] == [2]
    box.mark_sent([2], [1_000])
    assert box.due(999, 10) == [] and [r.seq for r in box.due(1_000, 10)] == [2]
