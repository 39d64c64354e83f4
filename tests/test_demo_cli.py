"""`midgate demo`: the in-process demo over real parts, checked from the files it leaves behind.

The full run is checked independently of the demo's own verdict: the ledger it wrote is audited with the members'
checkpoints, every contribution leaf is opened with the device keys from disk, the settlement record is recomputed
and summed, and the fork it built is caught only by a member's checkpoint.
"""

from __future__ import annotations

import io
import os
import shlex
import tempfile
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from coordinator.ledger.audit import LedgerCorruptError, audit_ledger
from coordinator.ledger.store import LedgerReader
from coordinator.royalties import recompute_settlement
from coordinator.royalties.ledger_records import iter_splits
from demo import reports
from demo.checks import Outcomes
from demo.reports import IngestChecks, seal_report, show_rejections
from demo.training import LocalUpdate
from edge.sensors.export import window_spec_for
from edge.sensors.store import SampleStore
from midgate_cli import app
from protocol.envelope import KeyRing, decode, open_envelope
from protocol.errors import Reason
from protocol.identity import SignerKey, VerifierKey, load_signer_key, save_signer_key
from protocol.leaves import LeafKind, decode_leaf
from protocol.messages import ContributionReport
from protocol.tasks.spec import PLAID_APPLIANCE
from protocol.witness import CosignaturePolicy, CosignatureVerifier

REJECTIONS = ("bad_signature", "unknown_key", "replayed", "too_large", "update_mismatch", "insecure_key_file")
HOUSEHOLDS = ("household-1", "household-2", "household-3", "household-4")


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "220"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.mark.slow  # about 8 s alone, 15-20 s on the shared 2-core machine
def test_full_demo_leaves_an_auditable_ledger_and_an_exact_settlement(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    code, out = _invoke("demo", "--workdir", str(workdir))
    assert code == 0, out
    assert "outcomes as expected" in out

    vkey = VerifierKey.parse((workdir / "log.vkey").read_text().strip())
    notes = [(workdir / "members" / f"{h}.checkpoint").read_bytes() for h in HOUSEHOLDS]
    report = audit_ledger(workdir / "ledger.db", vkey, notes)
    assert (report.size, report.trusted_checked) == (3 * 4 + 2, 4)  # 12 reports, settlement, royalty
    witnesses = tuple(
        CosignatureVerifier.parse((workdir / "members" / f"{h}.witness.vkey").read_text()) for h in HOUSEHOLDS
    )
    with LedgerReader.open_existing(workdir / "ledger.db") as ledger:
        CosignaturePolicy(witnesses, quorum=4).check(ledger.checkpoint(), vkey)  # every member cosigned the latest

    devices = {h: load_signer_key(workdir / "keys" / f"{h}.key") for h in HOUSEHOLDS}
    for key in devices.values():
        assert (workdir / "keys" / f"{key.name}.key").stat().st_mode & 0o777 == 0o600
    ring = KeyRing([k.verifier for k in devices.values()])
    with LedgerReader.open_existing(workdir / "ledger.db") as ledger:
        leaves = [decode_leaf(data) for _, data in ledger.leaves(0, ledger.size)]
        splits = list(iter_splits(ledger))
    contributions = [leaf for leaf in leaves if leaf.kind is LeafKind.CONTRIBUTION]
    assert len(contributions) == 12
    by_signer: dict[str, list[ContributionReport]] = {}
    for leaf in contributions:
        verified = open_envelope(leaf.signed, ring, ContributionReport.PAYLOAD_TYPE)
        by_signer.setdefault(verified.signer.name, []).append(decode(verified, ContributionReport))
    for household, sent in by_signer.items():
        assert [r.seq for r in sent] == [1, 2, 3]
        # The fingerprint in each report is the Merkle root of the windows in that household's own store.
        with SampleStore(workdir / "households" / f"{household}.db") as store:
            windows = store.windows(window_spec_for(PLAID_APPLIANCE, "plaid"))
        assert {r.dataset_fingerprint for r in sent} == {windows.fingerprint().hex()}
    rider = by_signer["household-4"]
    assert all(r.global_model_sha256 == r.update_sha256 for r in rider)  # sent the model back untouched
    assert all(r.global_model_sha256 != r.update_sha256 for h in HOUSEHOLDS[:3] for r in by_signer[h])

    assert [s.record.inputs.kind for s in splits] == ["settlement", "royalty"]
    earned = 0
    for split in splits:
        assert recompute_settlement(split.record_bytes) == split.record_bytes
        record = split.record
        payment = record.inputs.payment_minor
        paid = {p.member: p for p in record.payouts}
        assert record.fee_minor + sum(p.amount_minor for p in record.payouts) + record.unallocated_minor == payment
        assert record.fee_minor * 10_000 <= 3_000 * payment
        assert (paid["household-4"].amount_minor, paid["household-4"].reason) == (0, "screened")
        assert all(paid[h].amount_minor > 0 for h in HOUSEHOLDS[:3])
        earned += paid["household-1"].amount_minor
    statement = (workdir / "statements" / "household-1.statement.txt").read_text()
    assert f"Total: {earned} EUR minor units" in statement

    fork = workdir / "attack" / "rewritten-ledger.db"
    audit_ledger(fork, vkey)  # re-signed by the MID's own key, so the file alone looks fine
    with pytest.raises(LedgerCorruptError, match="trusted checkpoint at size 14"):
        audit_ledger(fork, vkey, [notes[0]])

    for reason in REJECTIONS:
        assert out.count(reason) >= 2, reason  # expected and got columns
    # The free rider's reputation falls below a job's minimum; the honest households' rise above it.
    assert "who meets a job's minimum reputation of 500: ['household-1', 'household-2', 'household-3']" in out
    for part in ("MQTT broker", "coordinator ingest service", "Flower SuperLink / SuperNodes", "buyer HTTP API"):
        assert part in out
    assert "uses TLS" in out

    # The commands the demo prints for members work as printed; only the one on the fork fails.
    commands = [shlex.split(s)[1:] for s in out.splitlines() if s.strip().startswith("midgate ledger ")]
    assert [c[:2] for c in commands] == [
        ["ledger", "verify"],
        ["ledger", "recompute-settlement"],
        ["ledger", "verify-proof"],
        ["ledger", "verify"],
    ]
    assert commands[2].count("--witness") == 4 and commands[2][-2:] == ["--quorum", "3"]
    results = [_invoke(*command) for command in commands]
    assert [code for code, _ in results] == [0, 0, 0, 1], results
    assert "trusted checkpoint at size 14" in results[3][1]


def _accepted_report(tmp_path: Path) -> tuple[IngestChecks, SignerKey, Path, tuple[ContributionReport, bytes, dict]]:
    key_file = tmp_path / "dev-a.key"
    save_signer_key(key_file, SignerKey.generate("dev-a"))
    key = load_signer_key(key_file)
    received = {"w": np.zeros(4, np.float32)}
    returned = {"w": np.arange(4, dtype=np.float32)}
    update = LocalUpdate("dev-a", received, returned, 10, 2.0, 1.5, 0.1)
    report, envelope = seal_report(
        key, update, run_id=1, round_index=1, node_id=7, seq=41, nonce="ab" * 16, fingerprint_hex="c3" * 32
    )
    checks = IngestChecks(KeyRing([key.verifier]))
    checks.accept(envelope, returned)
    return checks, key, key_file, (report, envelope, returned)


def test_every_refusal_has_its_reason_code_and_the_key_file_is_restored(tmp_path: Path) -> None:
    checks, key, key_file, accepted = _accepted_report(tmp_path)
    out = io.StringIO()
    outcomes = Outcomes(Console(file=out, width=200))
    show_rejections(checks, accepted, key, key_file, outcomes, outcomes.console)
    assert outcomes.all_ok, outcomes.failed
    assert [s.got for s in outcomes.steps] == list(REJECTIONS)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert checks.last_seq == {key.verifier.key_id.hex(): 41}  # no refusal moved the replay window


def test_a_tampering_that_goes_unnoticed_fails_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reports, "tampered", lambda envelope: envelope)
    checks, key, key_file, accepted = _accepted_report(tmp_path)
    outcomes = Outcomes(Console(file=io.StringIO(), width=200))
    show_rejections(checks, accepted, key, key_file, outcomes, outcomes.console)
    assert not outcomes.all_ok
    assert [(s.expected, s.got) for s in outcomes.failed] == [(str(Reason.BAD_SIGNATURE), "replayed")]


def test_workdir_must_be_new_or_empty(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").write_bytes(b"someone's ledger")
    code, out = _invoke("demo", "--workdir", str(tmp_path))
    assert code == 2
    assert "not empty" in out
    assert (tmp_path / "ledger.db").read_bytes() == b"someone's ledger"


def test_without_workdir_the_temp_folder_is_removed_and_a_failed_step_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import demo.run

    seen: list[Path] = []

    def failing_run(workdir: Path, console: Console, rounds: int) -> bool:
        (workdir / "ledger.db").write_bytes(b"x")
        seen.append(workdir)
        return False

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(demo.run, "run", failing_run)
    code, _ = _invoke("demo", "--rounds", "2")
    assert code == 1
    assert seen and seen[0].parent == tmp_path
    assert os.listdir(tmp_path) == []


def test_missing_plaid_stops_the_demo_with_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import edge.sensors.plaid

    monkeypatch.setattr(edge.sensors.plaid, "PLAID_PACKAGE", "midgate-no-such-package")
    code, out = _invoke("demo", "--workdir", str(tmp_path / "demo"))
    assert code == 1
    assert "the demo stopped: sensor_unavailable" in out
    assert "pip install 'sktime==1.2.*'" in out
    assert not (tmp_path / "demo" / "ledger.db").exists()
