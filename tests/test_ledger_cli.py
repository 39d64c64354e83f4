"""`midgate ledger` commands: exit 0 + ok when valid, 1 + reason when not, 2 on usage errors."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.ledger.cli import app
from coordinator.ledger.store import LedgerStore
from protocol.identity import SignerKey, save_signer_key
from protocol.leaves import Leaf, LeafKind
from protocol.merkle import leaf_hash
from protocol.note import parse_note
from protocol.witness import Cosigner

runner = CliRunner()


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    key = SignerKey.generate("mid.example/ledger")
    db = tmp_path / "ledger.db"
    with LedgerStore.open(db, key) as store:
        store.append_leaves([Leaf(LeafKind.ENROL, b"enrol device 1"), Leaf(LeafKind.CONTRIBUTION, b"dsse 1")])
        (tmp_path / "old.checkpoint").write_bytes(store.checkpoint())
        store.append_leaves([Leaf(LeafKind.STRIKE, b"strike"), Leaf(LeafKind.SETTLEMENT, b"settle")])
        store.append_leaves([Leaf(LeafKind.ROYALTY, b"royalty")])
        (tmp_path / "leaf1").write_bytes(store.leaf(1))
    (tmp_path / "log.vkey").write_text(key.verifier.text() + "\n")
    save_signer_key(tmp_path / "log.key", key)
    return {"db": db, "vkey": tmp_path / "log.vkey", "dir": tmp_path, "leaf1": tmp_path / "leaf1"}


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_proof_then_verify_proof(setup: dict[str, Path]) -> None:
    code, receipt = _run("proof", str(setup["db"]), "1")
    assert code == 0 and receipt.startswith("c2sp.org/tlog-proof@v1\nindex 1\n")
    proof = setup["dir"] / "leaf1.tlog-proof"
    proof.write_text(receipt)
    vkey = str(setup["vkey"])
    assert _run("verify-proof", str(proof), "--vkey", vkey, "--leaf", str(setup["leaf1"]))[1].splitlines()[0] == "ok"
    hash_b64 = base64.b64encode(leaf_hash(setup["leaf1"].read_bytes())).decode()
    assert _run("verify-proof", str(proof), "--vkey", vkey, "--leaf-hash", hash_b64)[0] == 0

    other = setup["dir"] / "other"
    other.write_bytes(b"not the leaf")
    code, output = _run("verify-proof", str(proof), "--vkey", vkey, "--leaf", str(other))
    assert code == 1 and "root_mismatch" in output
    proof.write_text(receipt.replace("index 1", "index 2"))
    assert _run("verify-proof", str(proof), "--vkey", vkey, "--leaf", str(setup["leaf1"]))[0] == 1
    stranger = SignerKey.generate("mid.example/ledger").verifier.text()
    proof.write_text(receipt)
    code, output = _run("verify-proof", str(proof), "--vkey", stranger, "--leaf", str(setup["leaf1"]))
    assert code == 1 and "unknown_key" in output


def test_verify_proof_usage_errors_exit_2(setup: dict[str, Path]) -> None:
    proof = setup["dir"] / "p"
    proof.write_text(_run("proof", str(setup["db"]), "0")[1])
    vkey, leaf = str(setup["vkey"]), str(setup["leaf1"])
    h = base64.b64encode(b"\x00" * 32).decode()
    assert _run("verify-proof", str(proof), "--vkey", vkey)[0] == 2
    assert _run("verify-proof", str(proof), "--vkey", vkey, "--leaf", leaf, "--leaf-hash", h)[0] == 2
    assert _run("verify-proof", str(proof), "--vkey", vkey, "--leaf-hash", "c2hvcnQ=")[0] == 2
    assert _run("verify-proof", str(proof), "--vkey", "not-a-key", "--leaf", leaf)[0] == 2
    assert _run("verify-proof", str(setup["dir"] / "missing"), "--vkey", vkey, "--leaf", leaf)[0] == 2
    assert _run("proof", str(setup["db"]))[0] == 2


def test_verify_consistency_with_witness_body(setup: dict[str, Path]) -> None:
    code, body = _run("proof", str(setup["db"]), "--old", "2")
    assert code == 0 and body.startswith("old 2\n")
    body_file = setup["dir"] / "body"
    body_file.write_text(body)
    old = str(setup["dir"] / "old.checkpoint")
    args = ["verify-consistency", str(body_file), "--vkey", str(setup["vkey"]), "--old", old]
    code, output = _run(*args)
    assert code == 0 and output.splitlines()[0] == "ok"

    body_file.write_text(_run("proof", str(setup["db"]), "--old", "4")[1])
    code, output = _run(*args)
    assert code == 1 and "inconsistent" in output  # old size 4 is not the size of the trusted checkpoint (2)

    lines = body.split("\n")
    lines[1] = base64.b64encode(b"\x09" * 32).decode()
    body_file.write_text("\n".join(lines))
    code, output = _run(*args)
    assert code == 1 and "root_mismatch" in output

    newest = setup["dir"] / "newest.checkpoint"
    newest.write_text(body.split("\n\n", 1)[1])
    body_file.write_text(body)
    code, output = _run("verify-consistency", str(body_file), "--vkey", str(setup["vkey"]), "--old", str(newest))
    assert code == 1 and "inconsistent" in output  # old size line says 2, the trusted checkpoint is 5


def test_show_lists_typed_entries(setup: dict[str, Path]) -> None:
    code, output = _run("show", str(setup["db"]), "--count", "3")
    assert code == 0
    lines = output.splitlines()
    assert lines[:2] == ["origin mid.example/ledger", "size 5"]
    assert [line.split("\t")[:2] for line in lines[3:]] == [["0", "enrol"], ["1", "contribution"], ["2", "strike"]]


def test_verify_command_in_a_real_process(setup: dict[str, Path]) -> None:
    cmd = [sys.executable, "-c", "from midgate_cli import app; app()", "ledger", "verify", str(setup["db"])]
    ok = subprocess.run([*cmd, "--vkey", str(setup["vkey"])], capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, "ok\n"), ok.stderr
    usage = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2, usage.stderr


def test_witness_quorum_on_receipts_and_bodies(setup: dict[str, Path]) -> None:
    key = SignerKey.parse((setup["dir"] / "log.key").read_text())
    cosigners = [Cosigner(SignerKey.generate(f"member{i}.example/witness")) for i in range(3)]
    for i, cosigner in enumerate(cosigners):
        (setup["dir"] / f"w{i}.vkey").write_text(cosigner.verifier.text())
    with LedgerStore.open(setup["db"], key) as store:
        text = parse_note(store.checkpoint()).text
        store.attach_cosignatures(
            store.size, [c.cosign(text, 1_790_000_000) for c in cosigners[:2]], [c.verifier for c in cosigners]
        )
    proof = setup["dir"] / "p"
    proof.write_text(_run("proof", str(setup["db"]), "1")[1])
    base = ["verify-proof", str(proof), "--vkey", str(setup["vkey"]), "--leaf", str(setup["leaf1"])]
    witnesses = [arg for i in range(3) for arg in ("--witness", str(setup["dir"] / f"w{i}.vkey"))]
    assert _run(*base, *witnesses, "--quorum", "2")[0] == 0
    code, output = _run(*base, *witnesses, "--quorum", "3")
    assert code == 1 and "quorum_not_met" in output
    assert _run(*base, *witnesses, "--quorum", "4")[0] == 2
    assert _run(*base, *witnesses)[0] == 2

    body = setup["dir"] / "body"
    body.write_text(_run("proof", str(setup["db"]), "--old", "2")[1])
    old = str(setup["dir"] / "old.checkpoint")
    consistency = ["verify-consistency", str(body), "--vkey", str(setup["vkey"]), "--old", old, *witnesses]
    assert _run(*consistency, "--quorum", "2")[0] == 0
    assert _run(*consistency, "--quorum", "3")[0] == 1
