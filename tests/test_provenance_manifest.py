"""Provenance manifests on a real SQLite ledger: a settled job's manifest is built, signed and verified offline; every
tamper (model bytes, a manifest field, the signature, the checkpoint, a proof, a cited leaf) is refused with its step
and reason; the commands `coordinator job manifest` and `buyer verify-model` do the same from the command line."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.ledger.store import LedgerStore
from coordinator.provenance.builder import build_manifest, find_settled_job
from coordinator.provenance.log_index import LogIndex
from coordinator.royalties.ledger_records import settle_logged_job
from coordinator.royalties.policy import KnobPolicy, RoyaltyPolicy
from midgate_cli import app as midgate
from protocol.checkpoint import Checkpoint, sign_checkpoint
from protocol.envelope import peek_envelope
from protocol.errors import ProtocolError, Reason, UnknownModelError
from protocol.identity import SignerKey, save_signer_key
from protocol.job_log import JobDeviceEntry, JobLogRecord, MemberValue, model_version
from protocol.leaves import Leaf, LeafKind
from protocol.merkle import merkle_root
from protocol.messages import ContributionReport
from protocol.provenance import (
    MAX_MANIFEST_BYTES,
    Manifest,
    PurposeTerms,
    manifest_reference,
    seal_manifest,
    verify_manifest,
)
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.spec import REGISTRY

MID = "riverside"
JOB = "job-7"
RUN = 4242
POLICY = RoyaltyPolicy(
    version=1, fee_bps=1500, knob=KnobPolicy(base_price_minor=1000, min_price_minor=100, max_price_minor=10_000)
)
NOW = 1_790_000_000_000
MEMBERS = ("ann", "bob")


@dataclass
class Settled:
    mid_key: SignerKey
    ledger: LedgerStore
    model: Path
    envelope: bytes
    contributions: list[bytes]


def _report(device: SignerKey, run_id: int, seq: int, server_round: int) -> bytes:
    report = ContributionReport(
        run_id=run_id,
        round=server_round,
        node_id=seq,
        task_id="plaid-appliance",
        task_version=1,
        global_model_sha256="a" * 64,
        update_sha256=hashlib.sha256(f"{run_id}-{seq}-{server_round}".encode()).hexdigest(),
        examples=10,
        dataset_fingerprint="b" * 64,
        loss_before=0.9,
        loss_after=0.5,
        seconds=1.0,
        seq=seq,
        device_time_ms=NOW,
        round_nonce="c" * 32,
    )
    return Leaf(LeafKind.CONTRIBUTION, report.seal(device)).encode()


def _job(arrays_hash: str) -> JobLogRecord:
    return JobLogRecord(
        job_id=JOB,
        run_id=RUN,
        task_id="plaid-appliance",
        task_version=1,
        purpose="research",
        buyer="acme",
        status="completed",
        rounds=2,
        rounds_completed=2,
        started_ms=NOW,
        ended_ms=NOW + 60_000,
        devices=tuple(
            JobDeviceEntry(device=f"dev-{m}", member=m, node_id=i + 1, selected=True) for i, m in enumerate(MEMBERS)
        ),
        final_model_sha256=arrays_hash,
        model_version=model_version(JOB, arrays_hash),
        attribution=tuple(
            MemberValue(member=m, value_units=500 + i, rounds=2, excluded_rounds=0) for i, m in enumerate(MEMBERS)
        ),
    )


def _purpose() -> PurposeTerms:
    return PurposeTerms(code="research", dpv="dpv:ResearchAndDevelopment", licence="research only", policy_version=1)


@pytest.fixture
def settled(tmp_path: Path) -> Iterator[Settled]:
    # Laid out as a coordinator's data_dir, so the commands find the key, the ledger and the run's model.
    data = tmp_path / "data"
    mid_key = SignerKey.generate(f"midgate/{MID}")
    save_signer_key(data / "mid.key", mid_key)
    ledger = LedgerStore.open(data / "ledger.sqlite", mid_key)
    devices = {m: SignerKey.generate(f"dev-{m}") for m in MEMBERS}
    arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, dtype=np.float32)}
    model = data / "federation" / "jobs" / f"run-{RUN}" / "final-model.npz"
    model.parent.mkdir(parents=True)
    with model.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    # Contribution leaves of this run, one of another run between them, then the JOB leaf and the settlement.
    ours = [_report(devices["ann"], RUN, 1, 1), _report(devices["bob"], RUN, 1, 1)]
    ledger.append([ours[0], _report(devices["ann"], RUN + 1, 2, 1), ours[1]])
    ours.append(_report(devices["ann"], RUN, 3, 2))
    ledger.append([ours[2]])
    job = _job(arrays_sha256(arrays))
    ledger.append_leaves([Leaf(LeafKind.JOB, job.canonical_json())])
    settle_logged_job(ledger, job, 10_000, currency="EUR", created_ms=NOW + 70_000, policy=POLICY)
    ledger.append([_report(devices["bob"], RUN, 4, 2)])  # after the settlement: not in the manifest's set
    envelope = build_manifest(
        ledger,
        JOB,
        mid=MID,
        mid_key=mid_key,
        model_path=model,
        spec=REGISTRY[("plaid-appliance", 1)],
        purpose=_purpose(),
        now_ms=NOW + 80_000,
    )
    yield Settled(mid_key, ledger, model, envelope, ours)
    ledger.close()


def _manifest(envelope: bytes) -> Manifest:
    return Manifest.model_validate_json(peek_envelope(envelope, max_size=MAX_MANIFEST_BYTES)[1])


def _refusal(envelope: bytes, model: Path, key: SignerKey) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        verify_manifest(envelope, model, key.verifier)
    return caught.value


def _resealed(s: Settled, **changes: object) -> bytes:
    """The manifest with `changes`, signed again by the MID key: what a wrong builder (not a forger) would issue."""
    data = _manifest(s.envelope).model_dump(mode="json")
    data.update(changes)
    return seal_manifest(Manifest.model_validate_json(json.dumps(data)), s.mid_key)


def test_a_settled_jobs_manifest_verifies_offline(settled: Settled) -> None:
    verified = verify_manifest(settled.envelope, settled.model, settled.mid_key.verifier)
    m = verified.manifest
    assert (m.job_id, m.mid, m.buyer, m.rounds, m.members) == (JOB, MID, "acme", 2, MEMBERS)
    assert m.model.sha256 == hashlib.sha256(settled.model.read_bytes()).hexdigest()
    assert m.task.spec_sha256 == hashlib.sha256(REGISTRY[("plaid-appliance", 1)].canonical_json()).hexdigest()
    # The contribution root is the RFC 9162 root over this run's contribution leaves before the settlement.
    assert (m.contributions.count, m.contributions.root) == (3, merkle_root(settled.contributions).hex())
    assert m.settlement_leaf.index == m.contributions.before_index == m.job_leaf.index + 1
    assert verified.reference == manifest_reference(m) == "manifest:" + hashlib.sha256(m.canonical_json()).hexdigest()
    assert verified.checkpoint.checkpoint.size > m.settlement_leaf.index


def test_other_model_bytes_are_refused(settled: Settled, tmp_path: Path) -> None:
    other = tmp_path / "other.npz"
    data = bytearray(settled.model.read_bytes())
    data[-30] ^= 1
    other.write_bytes(bytes(data))
    error = _refusal(settled.envelope, other, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.MODEL_MISMATCH, "model hash")


def test_a_changed_manifest_field_breaks_the_signature(settled: Settled) -> None:
    _, payload, _ = peek_envelope(settled.envelope, max_size=MAX_MANIFEST_BYTES)
    envelope = json.loads(settled.envelope)
    envelope["payload"] = base64.b64encode(payload.replace(b'"acme"', b'"evil"')).decode()
    error = _refusal(json.dumps(envelope).encode(), settled.model, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.BAD_SIGNATURE, "manifest signature")


def test_a_changed_signature_or_another_signer_is_refused(settled: Settled) -> None:
    envelope = json.loads(settled.envelope)
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[0] ^= 1
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    error = _refusal(json.dumps(envelope).encode(), settled.model, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.BAD_SIGNATURE, "manifest signature")
    impostor = SignerKey.generate(f"midgate/{MID}")
    forged = seal_manifest(_manifest(settled.envelope), impostor)
    error = _refusal(forged, settled.model, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.UNKNOWN_KEY, "manifest signature")


def test_a_checkpoint_not_signed_by_the_mid_is_refused(settled: Settled) -> None:
    m = _manifest(settled.envelope)
    lines = m.checkpoint.split("\n")
    # The same checkpoint text signed by another key of the same name: a forged signature line.
    impostor = SignerKey.generate(f"midgate/{MID}")
    cp = Checkpoint(lines[0], int(lines[1]), base64.b64decode(lines[2]))
    error = _refusal(
        _resealed(settled, checkpoint=sign_checkpoint(cp, impostor).decode()), settled.model, settled.mid_key
    )
    assert (error.reason, error.details["step"]) == (Reason.UNKNOWN_KEY, "checkpoint")
    # A checkpoint whose text was altered under the MID's signature line.
    altered = m.checkpoint.replace(f"\n{lines[1]}\n", f"\n{int(lines[1]) + 1}\n", 1)
    error = _refusal(_resealed(settled, checkpoint=altered), settled.model, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.BAD_SIGNATURE, "checkpoint")
    # A manifest that names another MID than the log it cites.
    error = _refusal(_resealed(settled, mid="elsewhere"), settled.model, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.MANIFEST_MISMATCH, "checkpoint")


def test_a_wrong_proof_or_index_is_refused(settled: Settled) -> None:
    m = _manifest(settled.envelope)
    proof = list(m.settlement_leaf.proof)
    proof[0] = base64.b64encode(bytes(32)).decode()
    bad = m.settlement_leaf.model_copy(update={"proof": tuple(proof)}).model_dump(mode="json")
    error = _refusal(_resealed(settled, settlement_leaf=bad), settled.model, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.ROOT_MISMATCH, "settlement inclusion")
    short = m.job_leaf.model_copy(update={"proof": m.job_leaf.proof[1:]}).model_dump(mode="json")
    error = _refusal(_resealed(settled, job_leaf=short), settled.model, settled.mid_key)
    assert (error.reason, error.details["step"]) == (Reason.BAD_PROOF, "job inclusion")


def test_a_field_the_cited_leaves_contradict_is_refused(settled: Settled) -> None:
    error = _refusal(_resealed(settled, buyer="other"), settled.model, settled.mid_key)
    assert (error.reason, error.details["step"], error.details["field"]) == (
        Reason.MANIFEST_MISMATCH,
        "leaves",
        "buyer",
    )
    error = _refusal(_resealed(settled, members=["ann"]), settled.model, settled.mid_key)
    assert (error.reason, error.details["field"]) == (Reason.MANIFEST_MISMATCH, "members")
    # The JOB leaf cited as the settlement: the proof holds (it is in the log), the kind does not.
    m = _manifest(settled.envelope)
    error = _refusal(
        _resealed(settled, settlement_leaf=m.job_leaf.model_dump(mode="json")), settled.model, settled.mid_key
    )
    assert error.reason is Reason.MANIFEST_MISMATCH and error.details["step"] == "leaves"


def test_the_commands_issue_once_and_verify(settled: Settled, tmp_path: Path) -> None:
    runner = CliRunner()
    manifest = tmp_path / "m.json"
    manifest.write_bytes(settled.envelope)
    key = settled.mid_key.verifier.text()
    ok = runner.invoke(midgate, ["buyer", "verify-model", str(settled.model), str(manifest), "--mid-key", key])
    assert ok.exit_code == 0, ok.output
    assert f"reference: {manifest_reference(_manifest(settled.envelope))}" in ok.output
    other = tmp_path / "other.npz"
    np.savez(other, w=np.zeros(3, dtype=np.float32))
    bad = runner.invoke(midgate, ["buyer", "verify-model", str(other), str(manifest), "--mid-key", key])
    assert bad.exit_code == 1 and "refused: model hash: model_mismatch" in bad.output, bad.output
    # With a copy of the log, the contribution root is recomputed too; a manifest whose root is not the log's fails.
    ledger = ["--ledger", str(settled.ledger.path)]
    audited = runner.invoke(
        midgate, ["buyer", "verify-model", str(settled.model), str(manifest), "--mid-key", key, *ledger]
    )
    assert audited.exit_code == 0 and "contribution root recomputed" in audited.output, audited.output
    wrong = _manifest(settled.envelope).contributions.model_copy(update={"root": "0" * 64}).model_dump(mode="json")
    manifest.write_bytes(_resealed(settled, contributions=wrong))
    refused = runner.invoke(
        midgate, ["buyer", "verify-model", str(settled.model), str(manifest), "--mid-key", key, *ledger]
    )
    assert refused.exit_code == 1 and "refused: contributions: manifest_mismatch" in refused.output, refused.output


def test_a_revenue_report_may_name_the_model_by_its_manifest(settled: Settled, tmp_path: Path) -> None:
    from coordinator.buyer.http import RevenueDesk
    from coordinator.provenance.shelf import ManifestShelf
    from coordinator.royalties.ledger_records import iter_splits
    from protocol.messages import RevenueReport

    shelf = ManifestShelf(tmp_path / "manifests", settled.mid_key.verifier)
    shelf.put(JOB, settled.envelope)
    assert shelf.put(JOB, b"another") == settled.envelope  # issued once
    buyer = SignerKey.generate("acme")
    desk = RevenueDesk(MID, "EUR", {"acme": buyer.verifier.text()}, settled.ledger, 16 * 1024, manifests=shelf)

    def report(model: str, seq: int) -> bytes:
        return RevenueReport(
            mid=MID,
            buyer="acme",
            model_id="appliances",
            model_version=model,
            period_start_ms=NOW,
            period_end_ms=NOW + 1000,
            amount_minor=3000,
            currency="EUR",
            seq=seq,
            issued_ms=NOW,
        ).seal(buyer)

    reference = manifest_reference(_manifest(settled.envelope))
    receipt = desk.accept(report(reference, 1), NOW + 90_000)
    royalty = [s for s in iter_splits(settled.ledger) if s.record.inputs.kind == "royalty"]
    assert [s.index for s in royalty] == [receipt.index]
    assert royalty[0].record.inputs.attribution.model_version == _manifest(settled.envelope).model_version
    with pytest.raises(ProtocolError) as caught:
        desk.accept(report("manifest:" + "0" * 64, 2), NOW + 90_000)
    assert caught.value.reason is Reason.UNKNOWN_MODEL


def test_the_operator_command_issues_a_settled_jobs_manifest_once(settled: Settled, tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(f'mid = "{MID}"\ndata_dir = "{tmp_path / "data"}"\n')
    runner = CliRunner()
    out = tmp_path / "issued.json"
    command = ["coordinator", "job", "manifest", JOB, "--out", str(out), "--config", str(config)]
    first = runner.invoke(midgate, command)
    assert first.exit_code == 0, first.output
    verified = verify_manifest(out.read_bytes(), settled.model, settled.mid_key.verifier)
    assert (
        verified.manifest.purpose.code == "research" and verified.manifest.purpose.dpv == "dpv:ResearchAndDevelopment"
    )
    assert f"reference: {verified.reference}" in first.output
    again = runner.invoke(midgate, command)
    assert (
        again.exit_code == 0
        and out.read_bytes() == (tmp_path / "data" / "manifests" / f"{JOB}.manifest.json").read_bytes()
    )
    assert f"reference: {verified.reference}" in again.output  # issued once: the same manifest
    unknown = runner.invoke(
        midgate, ["coordinator", "job", "manifest", "job-9", "--out", str(out), "--config", str(config)]
    )
    assert unknown.exit_code == 2 and "manifest refused: unknown_model" in unknown.output, unknown.output


def test_a_manifest_built_while_serve_appends_is_against_the_tree_the_reader_knows(settled: Settled) -> None:
    from coordinator.ledger.store import LedgerReader

    with LedgerReader.open_existing(settled.ledger.path) as reader:
        known = reader.size
        settled.ledger.append([_report(SignerKey.generate("dev-late"), RUN, 9, 2)])  # serve appends meanwhile
        envelope = build_manifest(
            reader,
            JOB,
            mid=MID,
            mid_key=settled.mid_key,
            model_path=settled.model,
            spec=REGISTRY[("plaid-appliance", 1)],
            purpose=_purpose(),
            now_ms=NOW + 90_000,
        )
    verified = verify_manifest(envelope, settled.model, settled.mid_key.verifier)
    assert verified.checkpoint.checkpoint.size == known < settled.ledger.size


def test_a_manifest_built_through_the_log_index_is_the_one_a_scan_builds(settled: Settled, tmp_path: Path) -> None:
    """The index (coordinator/provenance/log_index.py) finds the same JOB, SETTLEMENT and contribution leaves as a
    scan of the whole log, updated incrementally as the log grows and rebuilt for another log."""
    index = LogIndex(tmp_path / "log-index.sqlite")
    try:
        index.update(settled.ledger)
        other = SignerKey.generate("dev-cy")
        settled.ledger.append([_report(other, RUN, 5, 3)])  # after the settlement: seen by the update, not cited
        settled.ledger.append([_report(other, 2**64 - 1, 6, 1)])  # Flower run ids are u64, beyond SQLite's INTEGER
        index.update(settled.ledger)
        assert index.contributions(2**64 - 1, settled.ledger.size) == [settled.ledger.size - 1]
        assert len(index.contributions(RUN, settled.ledger.size)) == len(settled.contributions) + 2
        built = build_manifest(
            settled.ledger,
            JOB,
            mid=MID,
            mid_key=settled.mid_key,
            model_path=settled.model,
            spec=REGISTRY[("plaid-appliance", 1)],
            purpose=_purpose(),
            now_ms=NOW + 80_000,
            index=index,
        )
        scanned = build_manifest(
            settled.ledger,
            JOB,
            mid=MID,
            mid_key=settled.mid_key,
            model_path=settled.model,
            spec=REGISTRY[("plaid-appliance", 1)],
            purpose=_purpose(),
            now_ms=NOW + 80_000,
        )
        assert built == scanned
        assert _manifest(built).contributions.count == len(settled.contributions)
        with pytest.raises(UnknownModelError):
            find_settled_job(settled.ledger, "no-such-job", index)
        # Another log (a fresh data_dir) under the same index file: rebuilt, nothing of the first log kept.
        with LedgerStore.open(tmp_path / "other.sqlite", SignerKey.generate("midgate/other")) as fresh:
            fresh.append([_report(other, RUN, 1, 1)])
            index.update(fresh)
        assert index.first_job(JOB) is None and index.contributions(RUN, 10**9) == [0]
    finally:
        index.close()
