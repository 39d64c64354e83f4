"""Members check the MID on their own devices, on real processes: Mosquitto, `midgate coordinator serve` and two
`midgate agent run` daemons. Their reports are receipted, both agents cosign the MID's checkpoints as its witnesses
until one is witnessed, `midgate agent receipts --verify` proves every kept receipt under it, and each member's
`midgate agent statement` verifies its own lines (and only its own) on its own agent; a settlement leaf changed in
the MID's database afterwards is refused."""

from __future__ import annotations

import sqlite3
import subprocess
import urllib.error
import urllib.request

import pytest
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, wait_until, write_bodies

from coordinator.ledger.store import LedgerStore
from coordinator.mid_key import load_or_create_mid_key
from coordinator.royalties import KnobPolicy, MemberAttribution, ModelAttribution, RoyaltyPolicy, settle_job
from coordinator.royalties.ledger_records import append_split
from coordinator.royalties.settlement import decode_record
from protocol.checkpoint import parse_checkpoint_text
from protocol.leaves import decode_leaf
from protocol.note import parse_note

pytest_plugins = ["mqtt_fixtures"]

REPORTS = 10
POLICY = RoyaltyPolicy(
    version=1, fee_bps=2500, knob=KnobPolicy(base_price_minor=1_000, min_price_minor=100, max_price_minor=10_000)
)
CREATED = 1_800_000_000_000


def _settlement(job: str, payment: int, *members: str) -> bytes:
    attribution = ModelAttribution(
        job_id=job,
        model_version=f"{job}-v1",
        policy=POLICY,
        members=[
            MemberAttribution(
                member=m, value_units=10 * (i + 1), knob_milli=500 if m == "bob" else 0, rounds=5, excluded_rounds=0
            )
            for i, m in enumerate(members)
        ],
    )
    return settle_job(attribution, payment, record_id=f"{job}.settlement", created_ms=CREATED, currency="EUR")


def _agent(handle: AgentHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """`midgate agent ARGS --config ...` as the member types it, in its own process."""
    argv = [PYTHON, "-c", "from midgate_cli import app; app()", "agent", *args, "--config", str(handle.config)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def _witnessed_size(stack: MessagingStack) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/v1/checkpoint/witnessed", timeout=5) as r:
            note = r.read()
    except urllib.error.HTTPError:
        return -1
    return parse_checkpoint_text(parse_note(note).text).size


@pytest.mark.slow
def test_each_member_verifies_its_receipts_and_statement_on_its_own_agent(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    stack.start_broker()
    stack.start_coordinator()
    agents = [stack.enrol_agent(name, agent_extra="witness_every_s = 0.3") for name in ("ann", "bob")]
    ann, bob = agents

    # The settlements are appended while `serve` is down: it is the ledger's one writer while it runs.
    assert stack.coordinator is not None
    stack.coordinator.stop()
    mid_key = load_or_create_mid_key(stack.data_dir / "mid.key", stack.mid)
    with LedgerStore.open(stack.data_dir / "ledger.sqlite", mid_key) as ledger:
        shared = append_split(ledger, _settlement("job-both", 100_000, "ann", "bob"))
        append_split(ledger, _settlement("job-ann", 30_000, "ann"))
        record = decode_record(decode_leaf(ledger.leaf(shared)).signed)
    paid = {p.member: p.amount_minor for p in record.payouts}
    prices = {p.member: p.price_minor for p in record.payouts}
    stack.start_coordinator()

    for agent in agents:
        stack.start_invited_agent(agent)
    written = write_bodies(agents, REPORTS)
    wait_until(
        lambda: all(a.spool_left() == 0 and a.outbox_counts() == (0, len(written[a.device])) for a in agents),
        90,
        "every report receipted",
    )
    final = stack.ledger_size()
    wait_until(lambda: _witnessed_size(stack) == final, 60, "both agents cosigned the final checkpoint")
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/v1/checkpoint/witnessed", timeout=5) as r:
        cosigners = {sig.name for sig in parse_note(r.read()).signatures}
    assert {ann.device, bob.device} <= cosigners  # each running agent is a witness

    for agent in agents:
        receipts = _agent(agent, "receipts", "--verify")
        assert receipts.returncode == 0, receipts.stdout + receipts.stderr
        # Every report and the enrolment: proven from the kept envelope and receipt, under the witnessed checkpoint.
        assert receipts.stdout.count("witnessed") >= len(written[agent.device]) + 1, receipts.stdout
        assert "refused" not in receipts.stdout and "awaiting" not in receipts.stdout

    statements = {agent.name: _agent(agent, "statement") for agent in agents}
    for name, result in statements.items():
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"job job-both: {paid[name]} EUR minor units" in result.stdout
        # The line shows the knob the job priced the member at (bob's +0.5), and the price it gave.
        knob = "+0.500" if name == "bob" else "+0.000"
        assert f"(paid; knob {knob}, price {prices[name]} EUR; record job-both.settlement" in result.stdout
    assert "job job-ann" in statements["ann"].stdout
    assert "job job-ann" not in statements["bob"].stdout  # a member gets its own lines only

    # The MID's database changed behind the log's back: ann's share of job-both made larger.
    db = sqlite3.connect(stack.data_dir / "ledger.sqlite")
    (data,) = db.execute("SELECT data FROM leaves WHERE idx = ?", (shared,)).fetchone()
    old, new = f'"amount_minor":{paid["ann"]}'.encode(), f'"amount_minor":{paid["ann"] + 9000}'.encode()
    assert old in bytes(data)
    db.execute("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data).replace(old, new), shared))
    db.commit()
    db.close()
    tampered = _agent(ann, "statement")
    assert tampered.returncode == 1
    assert "statement refused: root_mismatch" in tampered.stderr and f"leaf_index={shared}" in tampered.stderr
    assert "Total" not in tampered.stdout  # nothing is printed of a statement that did not verify
