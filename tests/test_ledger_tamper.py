"""Tampering with a real ledger file: `midgate ledger verify` names the place, and members detect forks.

Each test edits the SQLite file directly, as an attacker with disk access (or the MID itself) would.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.ledger.cli import app
from coordinator.ledger.store import LedgerStore
from coordinator.ledger.tree import CompactRange
from protocol.checkpoint import AddCheckpointBody
from protocol.errors import RootMismatchError
from protocol.identity import SignerKey
from protocol.merkle import leaf_hash
from protocol.witness import LogView

BATCH, BATCHES, MEMBER_SIZE = 10, 12, 60


@pytest.fixture
def log_key() -> SignerKey:
    return SignerKey.generate("mid.example/ledger")


@pytest.fixture
def ledger(tmp_path: Path, log_key: SignerKey) -> Path:
    path = tmp_path / "ledger.db"
    with LedgerStore.open(path, log_key) as store:
        for b in range(BATCHES):
            store.append([f"entry {b * BATCH + i}: signed bytes".encode() for i in range(BATCH)])
        (tmp_path / "member.checkpoint").write_bytes(store.checkpoint(MEMBER_SIZE))
    (tmp_path / "log.vkey").write_text(log_key.verifier.text() + "\n")
    return path


def _verify(path: Path, *extra: str) -> tuple[int, str]:
    vkey = path.parent / "log.vkey"
    result = CliRunner().invoke(app, ["verify", str(path), "--vkey", str(vkey), *extra])
    return result.exit_code, result.output


def _sql(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    conn = sqlite3.connect(path)
    for sql, args in statements:
        conn.execute(sql, args)
    conn.commit()
    conn.close()


def _leaf(path: Path, index: int) -> bytes:
    conn = sqlite3.connect(path)
    data = bytes(conn.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()[0])
    conn.close()
    return data


def _rehash_batches(path: Path) -> None:
    """What a careful attacker does after editing leaves: recompute every stored tree hash to match."""
    conn = sqlite3.connect(path)
    tree = CompactRange()
    batches = conn.execute('SELECT start, "end" FROM batches ORDER BY "end"').fetchall()
    for start, end in batches:
        rows = conn.execute("SELECT data FROM leaves WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end))
        levels = tree.extend([leaf_hash(bytes(r[0])) for r in rows])
        blob = b"".join(h for level in levels for h in level)
        conn.execute('UPDATE batches SET hashes = ? WHERE "end" = ?', (blob, end))
    conn.commit()
    conn.close()


def test_untouched_ledger_verifies(ledger: Path) -> None:
    code, output = _verify(ledger)
    assert (code, output.splitlines()[0]) == (0, "ok")
    code, output = _verify(ledger, "--trusted", str(ledger.parent / "member.checkpoint"))
    assert code == 0, output


@pytest.mark.parametrize("index", [0, 37, BATCH * BATCHES - 1])
def test_one_changed_byte_in_a_leaf_is_named(ledger: Path, index: int) -> None:
    data = bytearray(_leaf(ledger, index))
    data[len(data) // 2] ^= 0x20
    _sql(ledger, ("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data), index)))
    code, output = _verify(ledger)
    assert code == 1
    assert f"leaf {index}:" in output


def test_one_changed_byte_with_rehashed_tree_is_caught_by_the_checkpoint(ledger: Path) -> None:
    data = bytearray(_leaf(ledger, 42))
    data[0] ^= 0x01
    _sql(ledger, ("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data), 42)))
    _rehash_batches(ledger)
    code, output = _verify(ledger)
    assert code == 1
    assert "checkpoint at size 50" in output  # the first checkpoint over leaf 42
    assert "signed root differs" in output


def test_deleted_row_is_named(ledger: Path) -> None:
    _sql(ledger, ("DELETE FROM leaves WHERE idx = ?", (55,)))
    code, output = _verify(ledger)
    assert code == 1
    assert "leaf 55:" in output and "missing" in output


def test_deleted_checkpoint_is_named(ledger: Path) -> None:
    _sql(ledger, ("DELETE FROM checkpoints WHERE size = ?", (30,)))
    code, output = _verify(ledger)
    assert code == 1
    assert "checkpoint at size 30" in output


def test_reordered_rows_are_named(ledger: Path) -> None:
    a, b = _leaf(ledger, 13), _leaf(ledger, 71)
    _sql(
        ledger,
        ("UPDATE leaves SET data = ? WHERE idx = ?", (b, 13)),
        ("UPDATE leaves SET data = ? WHERE idx = ?", (a, 71)),
    )
    code, output = _verify(ledger)
    assert code == 1
    assert "leaf 13:" in output


def test_replaced_tail_without_the_key_is_named(ledger: Path) -> None:
    for index in range(75, BATCH * BATCHES):
        _sql(ledger, ("UPDATE leaves SET data = ? WHERE idx = ?", (f"rewritten {index}".encode(), index)))
    _rehash_batches(ledger)
    code, output = _verify(ledger)
    assert code == 1
    assert "checkpoint at size 80" in output


def test_history_rewritten_and_resigned_by_the_mid_is_caught_by_members(
    tmp_path: Path, ledger: Path, log_key: SignerKey
) -> None:
    """The MID holds its key, so it can produce a self-consistent fork; a member's older checkpoint exposes it."""
    forked = tmp_path / "forked.db"
    with LedgerStore.open(forked, log_key) as fork:
        for b in range(BATCHES):
            fork.append(
                [
                    (f"entry {b * BATCH + i}: signed bytes" if b * BATCH + i < 55 else f"other {b}.{i}").encode()
                    for i in range(BATCH)
                ]
            )
        fork_body = AddCheckpointBody(MEMBER_SIZE, tuple(fork.consistency_proof(MEMBER_SIZE)), fork.checkpoint())
    member_checkpoint = tmp_path / "member.checkpoint"

    assert _verify(forked)[0] == 0  # self-consistent: only a checkpoint from outside the file can tell
    code, output = _verify(forked, "--trusted", str(member_checkpoint))
    assert code == 1
    assert f"trusted checkpoint at size {MEMBER_SIZE}" in output

    view = LogView(log_key.verifier, member_checkpoint.read_bytes())
    with pytest.raises(RootMismatchError):
        view.add_checkpoint(fork_body.encode())
    assert view.checkpoint.size == MEMBER_SIZE

    body_file = tmp_path / "fork.body"
    body_file.write_bytes(fork_body.encode())
    result = CliRunner().invoke(
        app,
        [
            "verify-consistency",
            str(body_file),
            "--vkey",
            str(tmp_path / "log.vkey"),
            "--old",
            str(member_checkpoint),
        ],
    )
    assert result.exit_code == 1
    assert "root_mismatch" in result.output

    with LedgerStore.open(ledger, log_key) as honest:
        body = AddCheckpointBody(MEMBER_SIZE, tuple(honest.consistency_proof(MEMBER_SIZE)), honest.checkpoint())
    LogView(log_key.verifier, member_checkpoint.read_bytes()).add_checkpoint(body.encode())


def test_truncated_log_is_caught_by_a_newer_trusted_checkpoint(tmp_path: Path, ledger: Path) -> None:
    newest = tmp_path / "newest.checkpoint"
    conn = sqlite3.connect(ledger)
    newest.write_bytes(bytes(conn.execute("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()[0]))
    conn.close()
    cut = 100
    _sql(
        ledger,
        ("DELETE FROM leaves WHERE idx >= ?", (cut,)),
        ('DELETE FROM batches WHERE "end" > ?', (cut,)),
        ("DELETE FROM checkpoints WHERE size > ?", (cut,)),
    )
    assert _verify(ledger)[0] == 0  # a consistent rollback: only a checkpoint from outside shows it
    code, output = _verify(ledger, "--trusted", str(newest))
    assert code == 1
    assert f"trusted checkpoint at size {BATCH * BATCHES}" in output and "truncated" in output
