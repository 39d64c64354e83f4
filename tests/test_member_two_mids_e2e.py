"""One member in two MIDs, on real processes: two `coordinator serve`s (riverside and hillside, each with its own
Mosquitto, data dir, SuperLink and MID key) and one `agent run` enrolled in both, with a separate device key and
member name per MID. Consent the member sets at riverside only (purpose `ads`, so not `research`) keeps it out of
riverside's research job, while hillside's job for the same buyer and purpose still selects it, runs (one real round)
and is settled (`coordinator job settle`). `agent portfolio` shows both memberships verified against their own
ledgers, hillside's settlement line the member's share in its ledger and the total across MIDs their sum, and
refuses hillside's membership (counting nothing of it) once that line is changed in hillside's database; neither
ledger names the other MID, its device, its member name or its key."""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agent_sensing import plaid_sensor_toml, wait_loaded
from fl_stack import midgate, start_federated_coordinator
from flower_fixtures import plaid_windows
from mqtt_fixtures import PYTHON, REPO, MessagingStack, wait_until
from test_member_choices_e2e import _heard, _job_start, _member, _member_choices

from coordinator.ledger.store import LedgerReader
from coordinator.registry.store import Registry
from coordinator.royalties.settlement import decode_record
from edge.agent.membership import load_membership
from protocol.identity import ALG_ED25519, VerifierKey
from protocol.leaves import decode_leaf
from protocol.tasks.windows import save_window_file

pytest_plugins = ["mqtt_fixtures"]


def _ledger_bytes(stack: MessagingStack) -> bytes:
    """Every leaf of the MID's ledger and the database files themselves (a name could hide in either)."""
    db = sqlite3.connect(f"file:{stack.data_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
    try:
        leaves = b"".join(bytes(data) for (data,) in db.execute("SELECT data FROM leaves ORDER BY idx"))
    finally:
        db.close()
    files = b"".join(p.read_bytes() for p in sorted(stack.data_dir.glob("ledger.sqlite*")))
    return leaves + files


def _traces(mid: str, device: str, member: str, key: VerifierKey) -> dict[str, bytes]:
    """What would link a membership to another MID: its names, its key id and its public key (raw and as text). The
    member's name as the JSON string leaves and records hold it: bare, a short name ("ann") is three bytes that the
    megabytes of hashes and signatures in a ledger's files hold by chance (seen once: 1 in 16.7 M per offset)."""
    return {
        "mid": mid.encode(),
        "device": device.encode(),
        "member": json.dumps(member).encode(),
        "key id": key.key_id.hex().encode(),
        "public key": key.public_key,
        "public key text": base64.b64encode(bytes([ALG_ED25519]) + key.public_key).decode().rstrip("=").encode(),
    }


def _task_sensors(stack: MessagingStack, member: str) -> dict[str, list[str]] | None:
    """The sensors per task of `member`'s consent as the MID keeps it (None: no consent kept)."""
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        consent = registry.consents().get(member)
    finally:
        registry.close()
    return None if consent is None else {t.task_id: list(t.sensors) for t in consent.task_sensors}


def _invited(stack: MessagingStack, job_id: str) -> list[str]:
    record = json.loads((stack.data_dir / "federation" / "job-book" / f"{job_id}.json").read_text())
    return sorted(d["device_id"] for d in record["invited"])


def _paid_job(stack: MessagingStack, job_id: str) -> subprocess.CompletedProcess[str]:
    """`coordinator job start` of buyer acme for research, one round on one node, validated on PLAID's test windows."""
    validation = stack.root / "validation-plaid.npz"
    save_window_file(validation, plaid_windows("test"))
    argv = [PYTHON, "-c", "from midgate_cli import app; app()", "coordinator", "job", "start", job_id, "--min-nodes"]
    argv += ["1", "--config", str(stack.config), "--task", "plaid-appliance@1", "--rounds", "1"]
    argv += ["--validation", str(validation), "--purpose", "research", "--buyer", "acme"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)


def _paid(stack: MessagingStack, index: int, member: str) -> int:
    """What the settlement at leaf `index` of the MID's ledger pays `member`."""
    with LedgerReader.open_existing(stack.data_dir / "ledger.sqlite") as reader:
        record = decode_record(decode_leaf(reader.leaf(index)).signed)
    return {p.member: p.amount_minor for p in record.payouts}[member]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_consent_at_one_mid_leaves_the_member_out_there_only_and_the_two_memberships_stay_unlinked(
    messaging_stack: MessagingStack, tmp_path: Path
) -> None:
    from edge.agent.config import AgentSettings
    from edge.agent.enrolment import enrol

    river = messaging_stack
    hill = MessagingStack(tmp_path / "hillside-mid", mid="hillside")
    failed = True
    try:
        with ThreadPoolExecutor(2) as starting:  # the two MIDs start side by side (each waits for its SuperLink)
            list(starting.map(start_federated_coordinator, (river, hill)))
        # The member's recordings: windows its agent cuts when hillside's job invites it.
        ann = river.enrol_agent("ann", "member_poll_s = 0.2\nwitness_every_s = 1.0\n" + plaid_sensor_toml("0:20"))
        record = enrol(AgentSettings.load(ann.config), f"http://127.0.0.1:{hill.http_port}", hill.invite("h-member-7"))
        hill_device = record.device
        river.start_agent(ann)
        wait_loaded(ann.data_dir / "samples.db")
        wait_until(lambda: _heard(river) == 1 and _heard(hill) == 1, 60, "both MIDs hear the agent", poll_s=0.5)

        # Consent at riverside only: purpose ads, so research is no longer allowed there.
        consent = _member(ann, "consent", "allow", "--purpose", "ads", "--mid", "riverside")
        assert consent.returncode == 0, consent.stderr
        wait_until(lambda: _member_choices(river, "ann")[1] == ("ads",), 60, "riverside to log the consent")
        assert _member_choices(hill, "h-member-7") == (None, "none")  # hillside heard nothing of it
        # The consent as an ISO/IEC TS 27560 record: riverside's, of its pseudonymous member, with the DPV concept.
        shown = _member(ann, "consent", "show", "--format", "27560", "--mid", "riverside")
        assert shown.returncode == 0, shown.stderr
        record = json.loads(shown.stdout)
        assert (record["controller"], record["data_subject"]["id"], record["status"]) == (
            {"id": "riverside"},
            "ann",
            "given",
        )
        assert [(p["code"], p["dpv"]) for p in record["purposes"]] == [("ads", "dpv:Advertising")]
        assert record["identifier"].startswith("consent-") and "hillside" not in shown.stdout

        # riverside leaves the member out of acme's research job; hillside selects it for the same job.
        job = _job_start(river, "job-r", "--min-nodes", "1")
        said = " ".join(job.stdout.split())
        assert job.returncode == 1, job.stdout + job.stderr
        assert f"not waiting for 1 device(s): {ann.device} (consent does not allow purpose research)" in said, said
        assert _invited(river, "job-r") == []
        # hillside runs the job with the member (a real run of one round on its SuperLink) and the operator records
        # the buyer's payment: the member earns there.
        job = _paid_job(hill, "job-h")
        said = " ".join(job.stdout.split())
        assert job.returncode == 0, job.stdout + job.stderr
        assert "not waiting for" not in said and "job job-h: completed" in said, said
        assert _invited(hill, "job-h") == [hill_device]
        settled = midgate("coordinator", "job", "settle", "job-h", "--payment", "10000", "--currency", "EUR",
                          "--config", str(hill.config))  # fmt: skip
        settlement = re.search(r"SETTLEMENT leaf (\d+)", settled)
        assert settlement is not None, settled
        earned = _paid(hill, int(settlement[1]), "h-member-7")

        # Sensors per task, at hillside: plaid-appliance may use only bme280 data, which is no source of its inputs
        # (plaid). Hillside no longer selects the member for it, and the agent refuses hillside's invitation too.
        sensors = _member(ann, "consent", "allow-sensor", "plaid-appliance", "bme280", "--mid", "hillside")
        assert sensors.returncode == 0, sensors.stderr
        wait_until(lambda: _task_sensors(hill, "h-member-7") == {"plaid-appliance": ["bme280"]}, 60, "the sensors")
        gap = "consent gives task plaid-appliance no sensor of its inputs (allowed: bme280; it takes: plaid)"
        job = _job_start(hill, "job-h2", "--min-nodes", "1")
        said = " ".join(job.stdout.split())
        assert job.returncode == 1 and f"not waiting for 1 device(s): {hill_device} ({gap})" in said, said
        assert _invited(hill, "job-h2") == []
        hill.publish_invitation(hill_device)
        agent = ann.process
        assert agent is not None
        wait_until(lambda: gap in agent.log_text(), 60, "the agent to decline the invitation for its sensors")

        # The portfolio: both memberships, each verified under its own MID's witnessed log; hillside's settlement
        # line is the member's share the ledger records, and the total across MIDs is the sum of the verified lines.
        line = f"job job-h: {earned} EUR minor units (leaf {settlement[1]})"
        verified = "both memberships' statements to verify, hillside's with the settlement"
        wait_until(lambda: line in _member(ann, "portfolio").stdout, 60, verified, poll_s=1.0)
        shown = _member(ann, "portfolio")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "hillside (member h-member-7), verified under its witnessed log of size" in shown.stdout, shown.stdout
        assert "riverside (member ann), verified under its witnessed log of size" in shown.stdout, shown.stdout
        assert shown.stdout.count("no earnings yet") == 1  # riverside's
        assert shown.stdout.endswith(f"Total across MIDs: {earned} EUR minor units\n"), shown.stdout

        # Separate keys per MID, and neither ledger names the other membership.
        river_key = load_membership(ann.data_dir / "mids" / "riverside").key.verifier
        hill_key = load_membership(ann.data_dir / "mids" / "hillside").key.verifier
        assert river_key.public_key != hill_key.public_key
        river_traces = _traces("riverside", ann.device, "ann", river_key)
        hill_traces = _traces("hillside", hill_device, "h-member-7", hill_key)
        river_ledger, hill_ledger = _ledger_bytes(river), _ledger_bytes(hill)
        # The check can see a membership where it is logged: each ledger names its own device and key id.
        for traces, ledger in ((river_traces, river_ledger), (hill_traces, hill_ledger)):
            assert traces["device"] in ledger and traces["key id"] in ledger
        assert [what for what, trace in hill_traces.items() if trace in river_ledger] == []
        assert [what for what, trace in river_traces.items() if trace in hill_ledger] == []

        # hillside's settlement line changed in its database: that membership is refused and counts nothing, the
        # other is still verified.
        index = int(settlement[1])
        old = f'"amount_minor":{earned},"member":"h-member-7"'.encode()  # the payout, in the record's sorted keys
        db = sqlite3.connect(hill.data_dir / "ledger.sqlite")
        (data,) = db.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()
        assert old in bytes(data)
        tampered = bytes(data).replace(old, old.replace(f":{earned},".encode(), f":{earned + 9},".encode()))
        db.execute("UPDATE leaves SET data = ? WHERE idx = ?", (tampered, index))
        db.commit()
        db.close()
        refused = _member(ann, "portfolio")
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "hillside (member h-member-7): NOT COUNTED, refused:" in refused.stdout, refused.stdout
        assert "riverside (member ann), verified under its witnessed log of size" in refused.stdout, refused.stdout
        assert refused.stdout.endswith("Total across MIDs: nothing verified yet\n"), refused.stdout
        failed = False
    finally:
        hill.close(failed=failed)
