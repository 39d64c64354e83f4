"""Settlement and royalty leaves in a real SQLite transparency ledger: recompute from the ledger alone, royalties
for members who have left, statements whose receipts verify, and the recompute command's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.ledger.store import LedgerReader, LedgerStore
from coordinator.royalties import (
    KnobPolicy,
    MemberAttribution,
    ModelAttribution,
    RoyaltyPolicy,
    decode_record,
    settle_job,
)
from coordinator.royalties.cli import app
from coordinator.royalties.ledger_records import (
    append_split,
    find_split,
    model_attribution_from_ledger,
    recompute_from_ledger,
    report_revenue,
    statement_from_ledger,
)
from midgate_cli import app as midgate
from protocol.checkpoint import verify_receipt
from protocol.errors import MalformedError, SettlementMismatchError
from protocol.identity import SignerKey, save_signer_key
from protocol.leaves import Leaf, LeafKind

POLICY = RoyaltyPolicy(
    version=3, fee_bps=1500, knob=KnobPolicy(base_price_minor=1_000, min_price_minor=100, max_price_minor=10_000)
)


def attribution() -> ModelAttribution:
    members = [
        MemberAttribution(member="ann", value_units=700, knob_milli=0, rounds=5, excluded_rounds=0),
        MemberAttribution(member="bob", value_units=300, knob_milli=500, rounds=5, excluded_rounds=0),
        MemberAttribution(
            member="eve", value_units=0, knob_milli=0, rounds=5, excluded_rounds=5, screens=["zero_update"]
        ),
    ]
    return ModelAttribution(job_id="job-1", model_version="plaid-v1", policy=POLICY, members=members)


@pytest.fixture
def ledger(tmp_path: Path) -> tuple[LedgerStore, Path]:
    path = tmp_path / "ledger.sqlite"
    store = LedgerStore.open(path, SignerKey.generate("midgate/test-mid"))
    yield store, path
    store.close()


def test_settlement_and_royalty_recompute_from_the_ledger(ledger: tuple[LedgerStore, Path]) -> None:
    store, path = ledger
    settled = settle_job(attribution(), 100_000, record_id="job-1.settlement", created_ms=1_000, currency="EUR")
    index = append_split(store, settled)
    royalty_index = report_revenue(
        store, "plaid-v1", 40_001, record_id="plaid-v1.rev-1", created_ms=9_000, currency="EUR"
    )
    assert royalty_index == index + 1

    with LedgerReader.open_existing(path) as reader:
        assert find_split(reader, "job-1.settlement").record_bytes == settled
        for record_id in ("job-1.settlement", "plaid-v1.rev-1"):
            result = recompute_from_ledger(reader, record_id)
            assert result.matches
        royalty = find_split(reader, "plaid-v1.rev-1")
        assert royalty.record.inputs.kind == "royalty"
        assert royalty.record.inputs.attribution == model_attribution_from_ledger(reader, "plaid-v1")
        paid = {p.member: p.amount_minor for p in royalty.record.payouts}
        assert sum(paid.values()) + royalty.record.fee_minor == 40_001
        assert paid["eve"] == 0 and paid["ann"] > paid["bob"] > 0


def test_royalty_reaches_a_member_the_registry_no_longer_has(ledger: tuple[LedgerStore, Path]) -> None:
    store, _ = ledger
    append_split(store, settle_job(attribution(), 10_000, record_id="s", created_ms=1, currency="EUR"))
    # Nothing about current membership is consulted: the split comes from the leaf, so "bob" is paid after leaving.
    report_revenue(store, "plaid-v1", 5_000, record_id="r", created_ms=2, currency="EUR")
    payouts = {p.member: p.amount_minor for p in find_split(store, "r").record.payouts}
    assert payouts["bob"] > 0


def test_statement_receipts_verify_against_the_log_key(ledger: tuple[LedgerStore, Path]) -> None:
    store, _ = ledger
    append_split(store, settle_job(attribution(), 10_000, record_id="s", created_ms=1_000, currency="EUR"))
    report_revenue(store, "plaid-v1", 2_000, record_id="r", created_ms=2_000, currency="EUR")
    result = statement_from_ledger(store, "ann", period_start_ms=0, period_end_ms=10_000)
    assert [line.record_id for line in result.statement.lines] == ["s", "r"]
    for line in result.statement.lines:
        split = find_split(store, line.record_id)
        kind = LeafKind.SETTLEMENT if line.kind == "settlement" else LeafKind.ROYALTY
        verified = verify_receipt(
            result.receipts[line.record_id], Leaf(kind, split.record_bytes).encode(), store.verifier
        )
        assert verified.index == split.index


def test_a_record_that_does_not_reproduce_is_never_appended(ledger: tuple[LedgerStore, Path]) -> None:
    store, _ = ledger
    settled = settle_job(attribution(), 10_000, record_id="s", created_ms=1, currency="EUR")
    amounts = {p.member: p.amount_minor for p in decode_record(settled).payouts}
    tampered = settled.replace(
        f'"amount_minor":{amounts["ann"]}'.encode(), f'"amount_minor":{amounts["ann"] - 1}'.encode()
    )
    with pytest.raises(SettlementMismatchError):
        append_split(store, tampered)
    assert store.size == 0
    append_split(store, settled)
    with pytest.raises(MalformedError):
        append_split(store, settled)
    assert store.size == 1


def test_recompute_command_exit_codes(ledger: tuple[LedgerStore, Path]) -> None:
    store, path = ledger
    settled = settle_job(attribution(), 10_000, record_id="good", created_ms=1, currency="EUR")
    append_split(store, settled)
    # A coordinator that logged a wrong split directly (bypassing append_split) is caught by any member.
    forged = settle_job(attribution(), 10_000, record_id="forged", created_ms=2, currency="EUR")
    amounts = {p.member: p.amount_minor for p in decode_record(forged).payouts}
    forged = forged.replace(
        f'"amount_minor":{amounts["ann"]}'.encode(), f'"amount_minor":{amounts["ann"] - 5}'.encode()
    ).replace(b'"fee_minor":1500', b'"fee_minor":1505')
    store.append_leaves([Leaf(LeafKind.SETTLEMENT, forged)])
    runner = CliRunner()

    ok = runner.invoke(app, ["recompute-settlement", "good", "--db", str(path)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == "ok"

    bad = runner.invoke(app, ["recompute-settlement", "forged", "--db", str(path)])
    assert bad.exit_code == 1
    assert "settlement_mismatch" in bad.stderr

    missing = runner.invoke(app, ["recompute-settlement", "nope", "--db", str(path)])
    assert missing.exit_code == 1
    assert "malformed" in missing.stderr

    statement = runner.invoke(app, ["statement", "ann", "--db", str(path), "--end-ms", "2"])
    assert statement.exit_code == 0, statement.output
    assert "job job-1" in statement.stdout


def test_record_revenue_and_ledger_recompute_commands(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    key_path = tmp_path / "mid.key"
    key = SignerKey.generate("midgate/test-mid")
    save_signer_key(key_path, key)
    with LedgerStore.open(path, key) as store:
        append_split(store, settle_job(attribution(), 10_000, record_id="s", created_ms=1, currency="EUR"))
    runner = CliRunner()
    common = ["--currency", "EUR", "--db", str(path), "--log-key", str(key_path)]

    logged = runner.invoke(app, ["record-revenue", "plaid-v1", "3000", "--record-id", "rev-1", *common])
    assert logged.exit_code == 0, logged.output
    assert "leaf 1" in logged.stdout
    unknown = runner.invoke(app, ["record-revenue", "no-such-model", "3000", "--record-id", "rev-2", *common])
    assert unknown.exit_code == 1
    assert "unknown_model: no settlement for this model version" in unknown.stderr

    # `midgate ledger recompute-settlement`, as the console script mounts it (midgate_cli).
    checked = runner.invoke(midgate, ["ledger", "recompute-settlement", "rev-1", "--db", str(path)])
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.strip() == "ok"
    with LedgerReader.open_existing(path) as reader:
        assert reader.size == 2
        assert sum(p.amount_minor for p in find_split(reader, "rev-1").record.payouts) == 3000 - 450


def test_record_revenue_ends_a_departed_members_royalties_only_under_a_policy_that_says_so(tmp_path: Path) -> None:
    """The operator's `royalties record-revenue` reads departures from the registry beside the ledger: under
    `[leave] royalties_continue = false` (no notice) bob, who left, gets `royalties_ended` and ann his share; a model
    trained under the default terms keeps paying bob."""
    from coordinator.registry.store import Registry

    path = tmp_path / "ledger.sqlite"
    key_path = tmp_path / "mid.key"
    key = SignerKey.generate("midgate/test-mid")
    save_signer_key(key_path, key)
    ending = POLICY.model_copy(update={"royalties_continue": False})
    ended_model = attribution().model_copy(update={"policy": ending, "model_version": "ending-v1", "job_id": "job-2"})
    with LedgerStore.open(path, key) as store:
        append_split(store, settle_job(attribution(), 10_000, record_id="s", created_ms=1, currency="EUR"))
        append_split(store, settle_job(ended_model, 10_000, record_id="s2", created_ms=1, currency="EUR"))
    registry = Registry(tmp_path / "registry.sqlite")
    try:
        registry.add_invite("inv-bob", "bob", 1, 10**13)
        registry.redeem_invite("inv-bob", 1, "dev-bob", SignerKey.generate("dev-bob").verifier, "$7$101$x$y")
        assert registry.record_departure("bob", 7, 2) == ["dev-bob"]
    finally:
        registry.close()
    runner = CliRunner()
    common = ["--currency", "EUR", "--db", str(path), "--log-key", str(key_path)]
    for model, record_id in (("plaid-v1", "rev-kept"), ("ending-v1", "rev-ended")):
        logged = runner.invoke(app, ["record-revenue", model, "3000", "--record-id", record_id, *common])
        assert logged.exit_code == 0, logged.output
    with LedgerReader.open_existing(path) as reader:
        kept, ended = find_split(reader, "rev-kept").record, find_split(reader, "rev-ended").record
        assert recompute_from_ledger(reader, "rev-ended").matches
        bob = statement_from_ledger(reader, "bob", period_start_ms=0, period_end_ms=2**62).statement
    assert {p.member: p.reason for p in kept.payouts}["bob"] == "paid" and kept.inputs.departed == []
    assert {p.member: (p.amount_minor, p.reason) for p in ended.payouts} == {
        "ann": (2550, "paid"),  # the whole members' pool: 3000 - 15 % fee
        "bob": (0, "royalties_ended"),
        "eve": (0, "screened"),
    }
    assert [(d.member, d.leave_leaf_index, d.left_ms) for d in ended.inputs.departed] == [("bob", 7, 2)]
    assert [(line.record_id, line.reason) for line in bob.lines if line.kind == "royalty"] == [
        ("rev-kept", "paid"),
        ("rev-ended", "royalties_ended"),
    ]
