"""Issue 6's acceptance test with real processes: "a device whose report names a different update hash is refused and
flagged". Mosquitto + `coordinator serve` (with its SuperLink, so contribution reports are cross-checked with the
strategy's round captures) + 3 enrolled `agent run`s with SuperNodes, a 2-round job (invitations and `flwr run` as in
tests/test_fl_roles_e2e.py). Two devices are honest: their reports usually arrive before the round's capture exists,
wait for it, and are then logged and receipted. One device lies: its member rewrites the ClientApp's records on disk
to name another update hash before the agent signs them. The coordinator refuses those reports (`update_mismatch`),
keeps them out of the ledger, flags the device with the signed evidence (`midgate coordinator flags`) and sends a
MID-signed Refusal; the agent moves them out of its outbox and stops resending them."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import psutil
import pytest
from flower_fixtures import APP_DIR, plaid_windows, split_by_label
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, agent_toml, free_port, wait_until

from coordinator.federation.capture import CaptureDirectory
from coordinator.federation.job import JobOutcome
from coordinator.federation.report_check import check_contribution
from coordinator.federation.superlink import FlowerCli, kill_pids
from coordinator.registry.enrolment import load_or_create_mid_key
from edge.agent.config import AgentSettings
from edge.agent.enrolment import enrol
from edge.agent.membership import load_memberships
from edge.agent.spool import report_fields, write_record
from protocol.envelope import peek_envelope
from protocol.messages import RoundInvitation
from protocol.tasks.contribution import ContributionRecord
from protocol.tasks.windows import save_window_file
from protocol.topics import DownKind, down_topic

pytest_plugins = ["mqtt_fixtures"]


def _flower_pids(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True) if "fl" in p.name()]
    except psutil.Error:
        return []


LIAR = "m2"


def _tamper_spool(handle: AgentHandle, nonce: str) -> dict[tuple[int, int], str]:
    """The liar's member rewrites each ClientApp record in the spool (the agent reads it only at start) into report
    fields naming another update hash; returns (node, round) -> the hash it now claims."""
    claimed = {}
    for path in sorted(handle.spool.glob("*.contribution.json")):
        record = json.loads(path.read_bytes())
        fields = report_fields(record, nonce)
        fields["update_sha256"] = hashlib.sha256(b"not the update I sent" + path.name.encode()).hexdigest()
        claimed[(int(record["node_id"]), int(record["round"]))] = fields["update_sha256"]
        write_record(handle.spool, path.name.removesuffix(".json") + "-edited", fields)
        path.unlink()
    return claimed


def _midgate(*args: str) -> str:
    return subprocess.run(
        [PYTHON, "-c", "from midgate_cli import app; app()", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def _flags(config: Path) -> list[dict[str, object]]:
    out = _midgate("coordinator", "flags", "--json", "--config", str(config))
    return [json.loads(line) for line in out.splitlines()]


def _outbox_refused(handle: AgentHandle) -> list[tuple[int, str]]:
    import sqlite3

    db = sqlite3.connect(f"file:{handle.outbox_path}?mode=ro", uri=True, timeout=30)
    try:
        return [(int(seq), str(reason)) for seq, reason in db.execute("SELECT seq, reason FROM refused ORDER BY seq")]
    finally:
        db.close()


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_a_device_whose_reports_name_another_update_hash_is_refused_and_flagged(
    messaging_stack: MessagingStack, tmp_path: Path
) -> None:
    stack = messaging_stack
    stack.start_broker()
    link_port = free_port()
    stack.coordinator_extra = f"[federation]\nenabled = true\nport = {link_port}\n"
    stack.start_coordinator()
    train = plaid_windows("train")
    agents = []
    for i, windows in enumerate(split_by_label(train, 3, seed=1)):
        name = f"m{i}"
        workdir = tmp_path / f"agent-{name}"
        workdir.mkdir()
        save_window_file(workdir / "windows.npz", windows)
        config = workdir / "agent.toml"
        toml = agent_toml(workdir / "data", f'training_windows = "{workdir / "windows.npz"}"')
        if name == LIAR:
            toml = toml.replace("spool_poll_s = 0.05", "spool_poll_s = 3600.0")
        config.write_text(toml)
        record = enrol(AgentSettings.load(config), f"http://127.0.0.1:{stack.http_port}", stack.invite(name))
        assert record.flower_node_id != 0
        handle = AgentHandle(name, workdir)
        handle.mid, handle.device = record.mid, record.device
        stack.agents.append(handle)
        stack.start_agent(handle)
        agents.append((handle, record))
    assert stack.broker is not None
    broker = stack.broker
    for handle, _ in agents:
        wait_until(
            lambda h=handle: f"Received PUBLISH from {h.device}" in broker.log_text(),  # type: ignore[misc]
            60,
            f"agent {handle.name} connected",
        )
    honest = [(h, r) for h, r in agents if h.name != LIAR]
    ((liar, liar_record),) = [(h, r) for h, r in agents if h.name == LIAR]

    mid_key = load_or_create_mid_key(stack.data_dir / "mid.key", stack.mid)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-mid-jobs")
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    below: list[int] = []
    try:
        now = time.time_ns() // 1_000_000
        nonces = {}
        for _, record in agents:
            nonces[record.flower_node_id] = secrets.token_hex(16)
            invitation = RoundInvitation(
                job_id="job-1",
                run_id=0,
                round=1,
                task_id="plaid-appliance",
                task_version=1,
                purpose="research",
                buyer="acme",
                nonce=nonces[record.flower_node_id],
                issued_ms=now,
                deadline_ms=now + 240_000,
            ).seal(mid_key)
            publisher.publish(
                down_topic(stack.mid, record.device, DownKind.INVITE), invitation, qos=1
            ).wait_for_publish(10)
        for handle, _ in agents:
            assert handle.process is not None and handle.process.proc is not None
            wait_until(lambda h=handle: "supernode started" in h.process.log_text(), 60, f"{handle.name} SuperNode")  # type: ignore[misc, union-attr]

        ca = stack.data_dir / "broker" / "tls" / "ca.crt"
        cli = FlowerCli(tmp_path / "flwr-cli", f"127.0.0.1:{link_port}", ca)
        cli.write_config()
        validation = tmp_path / "validation.npz"
        save_window_file(validation, plaid_windows("test"))
        # The coordinator cross-checks reports with the captures under its `[federation] jobs_dir` (default).
        jobs_dir = stack.data_dir / "federation" / "jobs"
        run_id = cli.submit_run(
            APP_DIR,
            {
                "selected-nodes": " ".join(str(r.flower_node_id) for _, r in agents),
                "validation-path": str(validation),
                "output-dir": str(jobs_dir),
                "num-rounds": 2,
                "local-epochs": 1,
            },
        )
        status = cli.wait_finished(run_id, timeout=200)
        assert status == "finished:completed"
        run_dir = jobs_dir / f"run-{run_id}"
        wait_until(lambda: (run_dir / "outcome.json").exists(), 30, "the ServerApp's outcome")
        outcome = JobOutcome.read(run_dir)
        assert outcome.status == "finished" and outcome.rounds_completed == 2 and outcome.drops == []

        # Every round's report of every honest node is in the ledger and receipted back to its agent.
        wait_until(
            lambda: all(h.outbox_counts()[0] == 0 and h.outbox_counts()[1] >= 2 for h, _ in honest),
            120,
            "every honest report receipted",
        )

        # The liar's member edits the records its agent has not taken in yet, then the agent starts over.
        wait_until(lambda: len(list(liar.spool.glob("*.contribution.json"))) == 2, 30, "the liar's two records")
        assert liar.process is not None and liar.process.proc is not None
        below += _flower_pids(liar.process.proc.pid)
        liar.process.stop()
        claimed = _tamper_spool(liar, nonces[liar_record.flower_node_id])
        stack.start_agent(liar)
        wait_until(lambda: len(_outbox_refused(liar)) == 2, 60, "the liar's agent told of both refusals")
        assert liar.outbox_counts() == (0, 0)  # nothing pending: nothing is resent; nothing receipted
        assert [reason for _, reason in _outbox_refused(liar)] == ["update_mismatch", "update_mismatch"]

        captures = CaptureDirectory(run_dir)
        flags = _flags(stack.config)
        assert {(f["device"], f["reason"], f["flagged"]) for f in flags} == {(liar.device, "update_mismatch", True)}
        assert len(flags) == 2
        for flag in flags:
            node, rnd = int(str(flag["node_id"])), int(str(flag["round"]))
            assert node == liar_record.flower_node_id
            capture = flag["capture"]
            assert isinstance(capture, dict)
            captured = {u.node_id: u.update_sha256 for u in captures.load_round(rnd).updates}
            assert capture["update_sha256"] == captured[node] != claimed[(node, rnd)]
            _, payload, _ = peek_envelope(base64.b64decode(str(flag["envelope_b64"])))
            assert json.loads(payload)["update_sha256"] == claimed[(node, rnd)]  # the device's own signed claim
        assert stack.metric("midgate_ingest_rejected_total", 'reason="update_mismatch"') >= 2

        # The agent stopped resending: its reports on the broker do not grow over two more heartbeats (5 s apart),
        # longer than its 2-4 s resend backoff.
        def published(kind: str) -> int:
            return broker.log_text().count(f"'mid/{stack.mid}/dev/{liar.device}/up/{kind}'")

        reports_sent, beats = published("report"), published("heartbeat")
        wait_until(lambda: published("heartbeat") >= beats + 2, 30, "two more heartbeats from the liar")
        assert published("report") == reports_sent

        by_node = {r.flower_node_id: r for _, r in honest}
        (liar_membership,) = load_memberships(liar.data_dir / "mids")
        seen = set()
        for key_id, _, envelope in stack.ledger_contributions():
            _, payload, _ = peek_envelope(envelope)
            fields = json.loads(payload)
            record = ContributionRecord.model_validate(
                {**{k: fields[k] for k in ContributionRecord.model_fields if k in fields}, "created_ms": 0},
                strict=False,
            )
            assert fields["round_nonce"] == nonces[record.node_id]
            assert key_id != liar_membership.key.key_id.hex() and record.node_id in by_node
            check_contribution(record, captures.load_round(record.round))
            seen.add((record.node_id, record.round))
        assert seen == {(n, r) for n in by_node for r in (1, 2)}
        for handle, _ in agents:
            assert handle.process is not None and handle.process.proc is not None
            below += _flower_pids(handle.process.proc.pid)
    except BaseException:
        for log in sorted(tmp_path.glob("agent-*/data/mids/*/jobs/*/supernode.log")):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-3000:]}")
        for log in sorted((stack.data_dir / "federation").glob("**/*.log")):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-6000:]}")
        raise
    finally:
        publisher.loop_stop()
        publisher.disconnect()
        for handle, _ in agents:
            if handle.process is not None and handle.process.proc is not None:
                below += _flower_pids(handle.process.proc.pid)
                handle.process.stop()
        kill_pids(below, 5.0)
