"""The member's commands against real processes: Mosquitto, `midgate coordinator serve` with its Flower SuperLink, a
real `midgate agent run`, and the commands run as CLI subprocesses. While the agent's SuperNode runs for a job,
pause / strike / leave stop it with every process below it (asserted by PID), invitations the member does not allow
start nothing, resume lets the next one start it again, and a StrikeVote (and its withdrawal) reaches the MID's
ledger with a receipt the agent verified. Under a policy (`coordinator policy apply`) whose quorum the one member's
strike reaches and whose `[strikes] running_jobs = "stop"`, the MID stops that buyer's job `coordinator job start`
is running: the command ends it failed with reason `strike`, as its JOB leaf says, after serve logged the strike in
force (STRIKE_QUORUM leaf). A leave is sent to the MID as a signed LeaveNotice and survives a restart
of the agent."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from agent_sensing import plaid_sensor_toml, wait_loaded
from fl_stack import midgate
from flower_fixtures import plaid_windows
from mqtt_fixtures import PYTHON, REPO, MosquittoProcess, ServiceProcess, agent_toml, signed_invitation, wait_until
from test_fl_roles import _enrol, _http_port, _invite, _supernodes, serve_with_superlink
from test_member_choices import strike_policy_toml

from coordinator.federation.superlink_process import kill_pids
from coordinator.mid_key import load_or_create_mid_key
from protocol.envelope import decode, open_envelope, peek_envelope
from protocol.identity import SignerKey, load_signer_key
from protocol.job_log import decode_job_record
from protocol.leaves import LeafKind, decode_leaf
from protocol.messages import StrikeVote
from protocol.strike_quorum import decode_strike_quorum
from protocol.tasks.windows import save_window_file
from protocol.topics import DownKind, UpKind, down_topic, up_topic

pytest_plugins = ["mqtt_fixtures"]
__all__ = ["serve_with_superlink"]  # the fixture, used by name

MID = "riverside"


class Device:
    """One enrolled member device: its agent process, the member commands, the MID's view over MQTT."""

    def __init__(self, tmp_path: Path, data_dir: Path, mosquitto: MosquittoProcess) -> None:
        self.tmp_path = tmp_path
        self.coordinator_dir = data_dir
        self.settings, self.record = _enrol(tmp_path, "ann", _http_port(data_dir), _invite(data_dir, "ann"))
        self.config = tmp_path / "agent-ann.toml"  # the member's recordings: windows to cut when a job invites it
        self.config.write_text(
            agent_toml(tmp_path / "agent-ann", "member_poll_s = 0.2\n" + plaid_sensor_toml("0:20"), warm_executor=True)
        )
        self.membership_dir = self.settings.membership_dir(MID)
        self.device_key = load_signer_key(self.membership_dir / "device.key").verifier
        self.mid_key: SignerKey = load_or_create_mid_key(data_dir / "mid.key", MID)
        self.agent: ServiceProcess | None = None
        self.tree: set[int] = set()
        self.statuses: list[str] = []
        self.mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-mid")
        self.mqtt.on_message = self._on_heartbeat
        self.mqtt.connect("127.0.0.1", mosquitto.port)
        self.mqtt.subscribe(up_topic(MID, self.record.device, UpKind.HEARTBEAT), qos=0)
        self.mqtt.loop_start()
        self.mosquitto = mosquitto
        self.runs = 0
        self.jobs: list[ServiceProcess] = []

    def _on_heartbeat(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        _, payload, _ = peek_envelope(bytes(message.payload))
        self.statuses.append(json.loads(payload)["status"])

    def start_agent(self) -> None:
        self.runs += 1
        self.agent = ServiceProcess("agent", ["agent", "run", "--config", str(self.config)], self.log_path)
        self.agent.start()
        before = len(self.statuses)
        wait_until(lambda: len(self.statuses) > before or not self.alive, 60, "the agent's first heartbeat")
        assert self.alive
        wait_loaded(self.tmp_path / "agent-ann" / "samples.db")  # the job windows it will be asked for

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.note_tree()
            self.agent.stop()

    @property
    def log_path(self) -> Path:
        return self.tmp_path / "agent.log"

    @property
    def alive(self) -> bool:
        return self.agent is not None and self.agent.alive

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`midgate agent ARGS --mid riverside --config ...` as the member would type it, in its own process."""
        argv = [PYTHON, "-c", "from midgate_cli import app; app()", "agent", *args, "--mid", MID, "--config"]
        return subprocess.run([*argv, str(self.config)], cwd=REPO, capture_output=True, text=True, timeout=60)

    def invite(self, job_id: str, buyer: str = "acme", purpose: str = "research", deadline_s: float = 300) -> None:
        run_id = int(hashlib.sha256(job_id.encode()).hexdigest()[:8], 16)
        invitation = signed_invitation(
            self.mid_key, job_id, run_id, deadline_s=deadline_s, buyer=buyer, purpose=purpose
        )
        topic = down_topic(MID, self.record.device, DownKind.INVITE)
        self.mqtt.publish(topic, invitation, qos=1).wait_for_publish(10)

    def supernodes(self) -> list[psutil.Process]:
        assert self.agent is not None and self.agent.proc is not None
        return _supernodes(self.agent.proc.pid)

    def note_tree(self) -> set[int]:
        """Every process below the agent right now (the SuperNode, its SuperExec and whatever they started), but
        the warm executor the agent keeps between jobs (keep_warm_executor): what it forked for the job is noted."""
        if self.agent is not None and self.agent.proc is not None:
            with contextlib.suppress(psutil.Error):
                below = psutil.Process(self.agent.proc.pid).children(recursive=True)
                self.tree |= {p.pid for p in below if p not in self.warm_executors()}
        return set(self.tree)

    def warm_executors(self) -> list[psutil.Process]:
        """The warm executor parents below the agent."""
        assert self.agent is not None and self.agent.proc is not None
        found = []
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.agent.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "edge.federated.acceleration.warm_executor" in proc.cmdline():
                        found.append(proc)
        return found

    def _below(self) -> list[str]:
        """Command lines of every process below the agent."""
        assert self.agent is not None and self.agent.proc is not None
        found = []
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.agent.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found.append(" ".join(proc.cmdline()))
        return found

    def wait_supernode(self, what: str) -> set[int]:
        """Wait for the job's SuperNode and its SuperExec (a process the SuperNode starts, or, when the SuperNode is
        forked from a warm executor, a thread of that fork); returns every process below the agent then."""
        wait_until(lambda: bool(self.supernodes()) or not self.alive, 60, what)
        assert self.alive
        wait_until(
            lambda: any("superexec" in cmd for cmd in self._below()) or bool(self.forked()),
            60,
            "the SuperNode's SuperExec, or its SuperNode forked warm",
        )
        return self.note_tree()

    def forked(self) -> list[psutil.Process]:
        """What the warm executors below the agent forked (their children carrying their command line)."""
        found = []
        for parent in self.warm_executors():
            with contextlib.suppress(psutil.Error):
                found += [c for c in parent.children() if c.cmdline() == parent.cmdline()]
        return found

    def wait_log(self, text: str, what: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.log() or not self.alive, timeout, what)
        assert self.alive, self.log()[-4000:]

    def wait_status(self, status: str) -> None:
        seen = len(self.statuses)
        wait_until(lambda: status in self.statuses[seen:], 30, f"a heartbeat saying {status}")

    def receipted(self, name: str) -> tuple[int, str] | None:
        """(leaf index, envelope SHA-256) of the outbox item `name` once the agent verified its receipt."""
        db = sqlite3.connect(f"file:{self.membership_dir / 'outbox.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            row = db.execute(
                "SELECT leaf_index, envelope_sha256 FROM receipts WHERE spool_name = ?", (name,)
            ).fetchone()
        finally:
            db.close()
        return None if row is None else (int(row[0]), str(row[1]))

    def strike_leaves(self) -> list[tuple[bytes, StrikeVote]]:
        """Every strike leaf in the MID's ledger: its signed bytes and the vote, verified with the device key."""
        db = sqlite3.connect(f"file:{self.coordinator_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            rows = db.execute("SELECT data FROM leaves ORDER BY idx").fetchall()
        finally:
            db.close()
        found = []
        trusted = {self.device_key.key_id.hex(): self.device_key}
        for (data,) in rows:
            leaf = decode_leaf(bytes(data))
            if leaf.kind is LeafKind.STRIKE:
                vote = decode(open_envelope(leaf.signed, trusted, StrikeVote.PAYLOAD_TYPE), StrikeVote)
                found.append((leaf.signed, vote))
        return found

    def leaves(self, kind: LeafKind) -> list[bytes]:
        """The signed bytes of every leaf of `kind` in the MID's ledger, in order."""
        db = sqlite3.connect(f"file:{self.coordinator_dir / 'ledger.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            leaves = [decode_leaf(bytes(data)) for (data,) in db.execute("SELECT data FROM leaves ORDER BY idx")]
        finally:
            db.close()
        return [leaf.signed for leaf in leaves if leaf.kind is kind]

    def start_job(self, job_id: str, buyer: str, config: Path) -> ServiceProcess:
        """The operator's `coordinator job start` of a research job for `buyer` on this one device (stopped at the
        end of the test); a real run on serve's SuperLink, validated on PLAID's test windows."""
        validation = self.tmp_path / "validation.npz"
        save_window_file(validation, plaid_windows("test"))
        job = ServiceProcess(
            "job",
            [
                "coordinator", "job", "start", job_id, "--config", str(config), "--task", "plaid-appliance@1",
                "--rounds", "3", "--min-nodes", "1", "--validation", str(validation), "--purpose", "research",
                "--buyer", buyer,
            ],
            self.tmp_path / f"job-{job_id}.log",
        )  # fmt: skip
        self.jobs.append(job)
        job.start()
        return job

    def strike_id(self) -> str:
        state = json.loads((self.membership_dir / "member.json").read_text())
        return str(state["strikes"][-1]["id"])

    def assert_tree_gone(self, tree: set[int]) -> None:
        assert tree, "no SuperNode processes were recorded"
        alive = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert alive == [], f"still running: {alive}"
        assert self.supernodes() == []
        # The kept warm executor runs no Flower process between jobs: nothing forked is left below it.
        assert [child.pid for warm in self.warm_executors() for child in warm.children(recursive=True)] == []

    def close(self, failed: bool) -> None:
        for job in self.jobs:
            if failed:
                print(f"---- {job.name} log ----\n{job.log_text()[-6000:]}")
            job.stop()
        if failed:
            print(f"---- agent log ----\n{self.log()[-10000:]}")
            for log in (self.tmp_path / "agent-ann").glob("**/supernode.log"):
                print(f"---- {log} ----\n{log.read_text(errors='replace')[-3000:]}")
        self.mqtt.loop_stop()
        self.mqtt.disconnect()
        self.stop_agent()
        kill_pids(sorted(self.tree), 5.0)


@pytest.fixture
def device(
    serve_with_superlink: tuple[ServiceProcess, Path, int],
    mosquitto: MosquittoProcess,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Device]:
    _, data_dir, _ = serve_with_superlink
    handle = Device(tmp_path, data_dir, mosquitto)
    try:
        yield handle
    finally:
        report = getattr(request.node, "rep_call", None)
        handle.close(report is None or report.failed)


@pytest.mark.slow
def test_pause_stops_the_supernode_and_declines_until_resume(device: Device) -> None:
    device.start_agent()
    device.wait_status("idle")
    device.invite("job-1")
    tree = device.wait_supernode("SuperNode started for job-1")
    device.wait_status("training")

    paused = device.command("pause")
    assert paused.returncode == 0, paused.stderr
    device.wait_log("supernode stopped: member_paused", "pause stops the SuperNode")
    device.assert_tree_gone(tree)
    device.wait_status("paused")

    # Invitations while paused -- a new job, and the paused job again -- start nothing.
    device.invite("job-2")
    device.wait_log("invitation declined: job job-2 of buyer acme for purpose research: member_paused", "decline")
    device.invite("job-1")
    device.wait_log("invitation declined: job job-1", "decline of the paused job")
    assert device.supernodes() == []

    resumed = device.command("resume")
    assert resumed.returncode == 0, resumed.stderr
    device.wait_log("member controls changed for riverside: taking part", "resume picked up")
    device.wait_status("idle")
    device.invite("job-3")
    device.wait_supernode("SuperNode started again after resume")


@pytest.mark.slow
def test_strike_against_the_jobs_buyer_stops_it_and_the_vote_is_receipted(device: Device) -> None:
    # The MID's policy: a strike of every active member (here the one) is in force, and stops the target's running
    # jobs. The operator applies it through the real command while serve runs.
    config = device.tmp_path / "coordinator.toml"
    policy = device.tmp_path / "policy.toml"
    policy.write_text(strike_policy_toml(10_000, 1, running_jobs="stop"))
    midgate("coordinator", "policy", "apply", str(policy), "--config", str(config))
    device.start_agent()
    job = device.start_job("job-1", "acme", config)
    tree = device.wait_supernode("SuperNode started for acme's job")
    wait_until(lambda: "submitted with 1 node(s)" in job.log_text() or not job.alive, 60, "the run submitted")

    struck = device.command("strike", "--buyer", "acme")
    assert struck.returncode == 0, struck.stderr
    device.wait_log("supernode stopped: member_striking (buyer acme)", "the strike stops acme's job")
    device.assert_tree_gone(tree)
    device.wait_status("striking")

    # At the quorum the MID stops the running job too: `job start` ends it failed with reason `strike`, serve logs
    # the strike in force (STRIKE_QUORUM, running jobs stop) and the job's JOB leaf says why it ended.
    assert job.proc is not None and job.proc.wait(timeout=120) == 1, job.log_text()
    said = " ".join(job.log_text().split())
    assert "stopped: 1 of 1 members strike against buyer acme" in said and "job-1: failed (strike)" in said, said
    (quorum,) = device.leaves(LeafKind.STRIKE_QUORUM)
    record = decode_strike_quorum(quorum)
    assert (record.target_buyer, record.in_force, record.running_jobs, record.strikers) == ("acme", True, "stop", 1)
    wait_until(lambda: device.leaves(LeafKind.JOB) != [], 30, "serve to log the stopped job")
    (logged,) = [decode_job_record(body) for body in device.leaves(LeafKind.JOB)]
    assert (logged.job_id, logged.status, logged.reason) == ("job-1", "failed", "strike")

    # The signed vote went through the outbox to the MID's ledger; the agent holds a receipt it verified.
    vote_name = f"strike-{device.strike_id()}-vote"
    wait_until(lambda: device.receipted(vote_name) is not None, 60, "the strike vote's receipt")
    receipt = device.receipted(vote_name)
    assert receipt is not None
    ((signed, vote),) = device.strike_leaves()
    assert (vote.target_buyer, vote.target_purpose, vote.withdraw, vote.end_ms) == ("acme", None, False, None)
    assert receipt[1] == hashlib.sha256(signed).hexdigest()

    device.invite("job-2", buyer="acme")
    device.wait_log("invitation declined: job job-2 of buyer acme", "acme's next job declined")
    assert device.supernodes() == []
    device.invite("job-3", buyer="globex")  # the strike is against acme only
    device.wait_supernode("SuperNode started for globex's job")

    withdrawn = device.command("unstrike", "--buyer", "acme")
    assert withdrawn.returncode == 0, withdrawn.stderr
    withdrawal = vote_name.replace("-vote", "-withdraw")
    wait_until(lambda: device.receipted(withdrawal) is not None, 60, "the withdrawal's receipt")
    (_, first), (_, second) = device.strike_leaves()
    assert (second.target_buyer, second.start_ms, second.withdraw) == ("acme", first.start_ms, True)
    assert second.end_ms is not None and second.end_ms > second.start_ms
    assert device.supernodes(), "the globex job keeps running"


@pytest.mark.slow
def test_leave_stops_the_supernode_for_good_and_the_outbox_still_delivers(device: Device) -> None:
    # Chosen while the daemon is not running: applied when it starts.
    struck = device.command("strike", "--purpose", "ads")
    assert struck.returncode == 0, struck.stderr
    vote_name = f"strike-{device.strike_id()}-vote"
    device.start_agent()
    wait_until(lambda: device.receipted(vote_name) is not None, 60, "the vote chosen before the agent started")
    device.invite("job-1", purpose="research")  # not covered by the strike against purpose ads
    tree = device.wait_supernode("SuperNode started for job-1")

    left = device.command("leave", "--yes")
    assert left.returncode == 0, left.stderr
    device.wait_log("supernode stopped: member_left", "leave stops the SuperNode")
    device.assert_tree_gone(tree)
    device.invite("job-2")
    device.wait_log("invitation declined: job job-2 of buyer acme for purpose research: member_left", "decline")
    assert device.supernodes() == []

    refused = device.command("resume")
    assert refused.returncode == 1 and "already_left" in refused.stderr

    # Once the outbox is delivered the agent tells the MID, signed: the MID logs the LeaveNotice (and revokes the
    # device's key with it: tests/test_member_choices_e2e.py), so nothing can be withdrawn after leaving.
    wait_until(lambda: device.receipted("leave") is not None, 60, "the leave notice's receipt")
    assert device.receipted(vote_name.replace("-vote", "-withdraw")) is None
    refused = device.command("unstrike")
    assert refused.returncode == 1 and "already_left" in refused.stderr

    # The leave notice receipted, the agent closes that membership's session for good (the MID revokes the broker
    # login with it): it stops retrying, and `agent status` says why.
    device.wait_log("connection closed for good: left the MID", "the agent to close the membership's connection")
    status = device.command("status")
    assert status.returncode == 0 and "closed" in status.stdout, status.stdout + status.stderr

    # For good: a restarted agent reads the file and does not connect for this membership at all.
    device.stop_agent()
    subscribed = f"Received SUBSCRIBE from {device.record.device}"
    before = device.mosquitto.log_text().count(subscribed)
    closed = device.log().count("connection closed for good")  # the log is appended to across restarts
    device.agent = ServiceProcess("agent", ["agent", "run", "--config", str(device.config)], device.log_path)
    device.agent.start()
    wait_until(lambda: device.log().count("connection closed for good") > closed, 60, "the restart to stay closed")
    assert device.mosquitto.log_text().count(subscribed) == before  # it never subscribed again
    assert device.supernodes() == []
