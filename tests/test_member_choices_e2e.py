"""Strikes the MID honours and a departure it records, on real processes: Mosquitto, `coordinator serve` with its
SuperLink (a strike quorum of every active member), two enrolled `agent run`s, and the member and operator commands
as CLI subprocesses. One member's strike is below the quorum (`coordinator strikes` says so); with the second the
strike is in force and `job start` refuses the buyer's job with reason `strike`; a withdrawal ends it. Then a member
leaves: its signed LeaveNotice is receipted, the MID revokes its key, no longer counts its vote, and still answers
its statement request. Every step is a leaf of the MID's ledger, in order."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest
from fl_stack import midgate, start_federated_coordinator
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, wait_until
from test_member_choices import strike_policy_toml

from coordinator.registry.store import Registry
from edge.agent.daemon_status import read_daemon_status
from protocol.leaves import LeafKind, decode_leaf
from protocol.strike_quorum import check_counted_votes, decode_strike_quorum

pytest_plugins = ["mqtt_fixtures"]


def _member(handle: AgentHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """A member command on the device, as the member types it."""
    argv = [PYTHON, "-c", "from midgate_cli import app; app()", "agent", *args, "--config", str(handle.config)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)


def _strikes(stack: MessagingStack) -> list[str]:
    return midgate("coordinator", "strikes", "--config", str(stack.config)).splitlines()


def _devices(stack: MessagingStack) -> dict[str, dict[str, str]]:
    header, *rows = midgate("coordinator", "devices", "--config", str(stack.config)).splitlines()
    columns = header.split("\t")
    return {row.split("\t")[0]: dict(zip(columns, row.split("\t"), strict=True)) for row in rows}


def _receipted(handle: AgentHandle, name: str) -> bool:
    db = sqlite3.connect(f"file:{handle.outbox_path}?mode=ro", uri=True, timeout=30)
    try:
        return db.execute("SELECT 1 FROM receipts WHERE spool_name = ?", (name,)).fetchone() is not None
    finally:
        db.close()


def _votes_logged(stack: MessagingStack) -> int:
    """StrikeVotes serve kept in the registry (read directly: polling through the CLI costs a process a look)."""
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        return len(registry.strike_votes())
    finally:
        registry.close()


def _quorum_leaves(stack: MessagingStack) -> list[bool]:
    """`in_force` of each STRIKE_QUORUM leaf serve logged, in order; each one's counted votes check against the log."""
    db = sqlite3.connect(f"file:{stack.data_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        leaves = {int(i): bytes(d) for i, d in db.execute("SELECT idx, data FROM leaves ORDER BY idx")}
    finally:
        db.close()
    found = []
    for data in leaves.values():
        leaf = decode_leaf(data)
        if leaf.kind is LeafKind.STRIKE_QUORUM:
            record = decode_strike_quorum(leaf.signed)
            check_counted_votes(record, leaves)
            found.append(record.in_force)
    return found


def _closed(directory: Path) -> str:
    status = read_daemon_status(directory)
    return "" if status is None else status.closed


def _revoked(stack: MessagingStack, device: str) -> bool:
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        found = registry.device(device)
        return found is not None and found.revoked
    finally:
        registry.close()


def _heard(stack: MessagingStack) -> int:
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        return len(registry.presence())
    finally:
        registry.close()


def _leaf_kinds(stack: MessagingStack) -> list[LeafKind]:
    db = sqlite3.connect(f"file:{stack.data_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        return [decode_leaf(bytes(data)).kind for (data,) in db.execute("SELECT data FROM leaves ORDER BY idx")]
    finally:
        db.close()


def _job_start(stack: MessagingStack, job_id: str = "job-struck", *options: str) -> subprocess.CompletedProcess[str]:
    """`coordinator job start` of buyer acme for research, to its end (these jobs end before any run)."""
    validation = stack.root / "validation.npz"
    validation.write_bytes(b"")
    argv = [PYTHON, "-c", "from midgate_cli import app; app()", "coordinator", "job", "start", job_id, *options]
    argv += ["--config", str(stack.config), "--task", "plaid-appliance@1", "--rounds", "1"]
    argv += ["--validation", str(validation), "--purpose", "research", "--buyer", "acme"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_strike_at_quorum_refuses_the_job_and_a_member_who_left_is_revoked_and_still_reads_its_statement(
    messaging_stack: MessagingStack,
) -> None:
    stack = messaging_stack
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    (stack.data_dir / "policy.toml").write_text(strike_policy_toml(10_000, 1))  # every active member, at least one
    start_federated_coordinator(stack)
    ann = stack.enrol_agent("ann", "member_poll_s = 0.2\nwitness_every_s = 1.0")
    bob = stack.enrol_agent("bob", "member_poll_s = 0.2\nwitness_every_s = 1.0")
    for handle in (ann, bob):
        stack.start_agent(handle)
    wait_until(lambda: _heard(stack) == 2, 60, "both agents heard", poll_s=0.5)

    # One of two members strikes: below the quorum of 2, nothing changes for the MID.
    assert _member(ann, "strike", "--buyer", "acme").returncode == 0
    wait_until(lambda: _votes_logged(stack) == 1, 60, "the MID to log ann's vote", poll_s=0.5)
    assert _strikes(stack) == [
        "2 active member(s); quorum 2 (100 % of them, at least 1); running jobs finish when a strike comes into force",
        "target\tstrikers\tquorum\tin_force\tmembers\tlogged",
        "buyer acme\t1\t2\tno\tann\t-",
    ]

    # The second member's vote reaches the quorum: the buyer's next job is refused with reason `strike`.
    assert _member(bob, "strike", "--buyer", "acme", "--purpose", "research").returncode == 0
    wait_until(lambda: _votes_logged(stack) == 2, 60, "the MID to log bob's vote", poll_s=0.5)
    wait_until(lambda: _quorum_leaves(stack) == [True], 30, "serve to log the strike in force", poll_s=0.5)
    assert "buyer acme, purpose research\t2\t2\tyes\tann,bob\tin force at leaf" in "\n".join(_strikes(stack))
    refused = _job_start(stack)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "job refused: strike: 2 of 2 members strike against buyer acme; buyer acme, purpose research" in (
        " ".join(refused.stderr.split())
    )
    assert not (stack.data_dir / "federation" / "job-book" / "job-struck.json").exists()  # nothing recorded

    # ann withdraws: the strike ends by the same rule.
    assert _member(ann, "unstrike", "--buyer", "acme").returncode == 0
    wait_until(lambda: _votes_logged(stack) == 3, 60, "the MID to log ann's withdrawal", poll_s=0.5)
    wait_until(lambda: _quorum_leaves(stack) == [True, False], 30, "serve to log the strike's end", poll_s=0.5)
    (ended,) = _strikes(stack)[2:]
    assert ended.startswith("buyer acme, purpose research\t1\t2\tno\tbob\tended at leaf"), ended

    # bob leaves: the notice is receipted, its key revoked, its vote no longer counts, its statement still answers.
    assert _member(bob, "leave", "--yes").returncode == 0
    wait_until(lambda: _receipted(bob, "leave"), 60, "the leave notice's receipt", poll_s=0.5)
    assert _revoked(stack, bob.device)  # in the same step as logging the notice
    shown = _devices(stack)
    assert (shown[bob.device]["key"], shown[ann.device]["key"]) == ("revoked", "active")
    assert _strikes(stack) == [
        "1 active member(s); quorum 1 (100 % of them, at least 1); running jobs finish when a strike comes into force",
        "no strike votes in force",
    ]
    # bob's agent closes that membership's connection for good rather than retry a login the MID revoked.
    bob_dir = bob.data_dir / "mids" / stack.mid
    wait_until(lambda: _closed(bob_dir) != "", 30, "bob's agent to close its connection", poll_s=0.5)
    assert "leave notice was receipted" in _closed(bob_dir)
    assert "closed" in _member(bob, "status").stdout  # (rich folds the table to the terminal width)
    statement = _member(bob, "statement", "--mid", "riverside")
    assert statement.returncode == 0, statement.stderr
    assert statement.stdout.startswith("Statement for member bob of riverside, verified under the witnessed log")

    wait_until(lambda: LeafKind.KEY_REVOKE in _leaf_kinds(stack), 30, "the key-revoke leaf", poll_s=0.5)
    kinds = [k for k in _leaf_kinds(stack) if k not in (LeafKind.ENROL, LeafKind.POLICY)]
    assert kinds == [
        *(LeafKind.STRIKE, LeafKind.STRIKE, LeafKind.STRIKE_QUORUM),  # bob's vote brings the strike into force
        *(LeafKind.STRIKE, LeafKind.STRIKE_QUORUM),  # ann's withdrawal ends it
        *(LeafKind.LEAVE, LeafKind.KEY_REVOKE),
    ]


def _member_choices(stack: MessagingStack, member: str) -> tuple[int | None, tuple[str, ...] | str | None]:
    """(knob, allowed purposes) serve kept for `member`; "none" while no consent is kept."""
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        knob, consent = registry.knobs().get(member), registry.consents().get(member)
        return (None if knob is None else knob.bias_milli), ("none" if consent is None else consent.allowed_purposes)
    finally:
        registry.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_knob_and_consent_a_member_sets_reach_the_mid_and_consent_keeps_it_out_of_a_job(
    messaging_stack: MessagingStack,
) -> None:
    stack = messaging_stack
    start_federated_coordinator(stack)
    ann = stack.enrol_agent("ann", "member_poll_s = 0.2")
    process = stack.start_agent(ann)
    wait_until(lambda: _heard(stack) == 1, 60, "the agent heard", poll_s=0.5)

    knob = _member(ann, "knob", "set", "0.5")
    assert knob.returncode == 0, knob.stderr
    # The MID's default policy: base 1000, alpha ln 2, bounds 100..100000; 1000 * 2^0.5, rounded.
    said = " ".join(knob.stdout.split())
    assert "riverside: knob +0.500: your price 1414 EUR minor units per job" in said, said
    assert "knob -1 -> 500, 0 -> 1000, +1 -> 2000" in said
    unknown = _member(ann, "consent", "allow", "--purpose", "astrology")
    assert unknown.returncode == 2 and "not in the MID's purposes (policy v1): astrology" in unknown.stderr
    consent = _member(ann, "consent", "allow", "--purpose", "ads")
    assert consent.returncode == 0, consent.stderr
    wait_until(lambda: _member_choices(stack, "ann") == (500, ("ads",)), 60, "the knob and consent logged")

    # The agent declines a research invitation on its own...
    stack.publish_invitation(ann.device)
    wait_until(lambda: "consent_excludes" in process.log_text(), 60, "the agent to decline the invitation")
    # ...and the MID does not select the member for a research job: with nobody else, too few nodes.
    job = _job_start(stack, "job-research", "--min-nodes", "1")
    said = " ".join(job.stdout.split())
    assert job.returncode == 1, job.stdout + job.stderr
    assert f"not waiting for 1 device(s): {ann.device} (consent does not allow purpose research)" in said, said
    assert "fewer than min_nodes 1" in said
    choices = [k for k in _leaf_kinds(stack) if k in (LeafKind.KNOB, LeafKind.CONSENT, LeafKind.STRIKE)]
    assert choices == [LeafKind.KNOB, LeafKind.CONSENT]  # (serve also logs the failed job as a JOB leaf)
