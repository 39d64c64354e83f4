"""`midgate agent status` says what the daemon is doing: the daemon's status file (connection and why it failed, the
running job, jobs joined, kept across restarts), read beside the outbox (reports waiting, the latest verified
receipt), and a stopped daemon's file is shown as what was true when it stopped."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from edge.agent.controls.commands import agent_table, outbox_state
from edge.agent.daemon_status import (
    STATUS_FILE,
    DaemonStatus,
    daemon_running,
    read_daemon_status,
    with_job,
    write_daemon_status,
)
from edge.agent.membership import OUTBOX_FILE, MembershipRecord, save_membership
from edge.agent.outbox import Outbox
from protocol.enrolment import BrokerCredentials
from protocol.identity import SignerKey, save_signer_key

NOW_MS = 1_795_000_000_000


def _membership(root: Path, mid: str = "riverside") -> Path:
    directory = root / "mids" / mid
    save_signer_key(directory / "device.key", SignerKey.generate("d-0123456789abcdef"))
    broker = BrokerCredentials(
        host="mid.example", port=8883, tls=False, username="d-0123456789abcdef", password="p" * 20
    )
    record = MembershipRecord(
        mid=mid,
        device="d-0123456789abcdef",
        member="ann",
        mid_key=SignerKey.generate(f"{mid}-log").verifier.text(),
        enrolment_url="http://mid.example",
        broker=broker,
        enrolled_ms=NOW_MS,
    )
    save_membership(directory, record)
    return directory


def _shown(directory: Path) -> dict[str, str]:
    console = Console(record=True, width=400)
    console.print(agent_table([directory]))
    text = console.export_text().splitlines()
    header = next(line for line in text if line.startswith("┃"))
    row = next(line for line in text if line.startswith("│"))
    cells = [[cell.strip() for cell in line[1:-1].split(line[0])] for line in (header, row)]
    return dict(zip(*cells, strict=True))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_status_file_is_replaced_whole_0600_and_counts_each_job_once(tmp_path: Path) -> None:
    status = DaemonStatus(pid=1, broker="mid.example:8883", connected=True, since_ms=NOW_MS)
    status = with_job(with_job(status, "job-1"), "job-1")
    status = with_job(with_job(status, None), "job-2")
    assert (status.job, status.jobs_joined, status.jobs_joined_count) == ("job-2", ("job-1", "job-2"), 2)
    write_daemon_status(tmp_path, status)
    assert read_daemon_status(tmp_path) == status
    assert stat.S_IMODE((tmp_path / STATUS_FILE).stat().st_mode) == 0o600
    (tmp_path / STATUS_FILE).write_text("{not json")
    assert read_daemon_status(tmp_path) is None
    assert read_daemon_status(tmp_path / "nowhere") is None


def test_agent_status_before_the_agent_ever_ran(tmp_path: Path) -> None:
    shown = _shown(_membership(tmp_path))
    assert shown["device"] == "d-0123456789abcdef"
    assert shown["connection"] == "agent not run yet (`midgate agent run`)"
    assert (shown["outbox"], shown["last verified receipt"], shown["jobs joined"]) == (
        "no outbox yet",
        "none yet",
        "none",
    )


def test_agent_status_of_a_running_daemon_that_cannot_connect_names_the_reason(tmp_path: Path) -> None:
    directory = _membership(tmp_path)
    status = DaemonStatus(
        pid=os.getpid(),
        broker="mid.example:8883",
        connected=False,
        since_ms=NOW_MS,
        failure="[Errno 111] Connection refused",
    )
    write_daemon_status(directory, with_job(status, "job-7"))
    outbox = Outbox(directory / OUTBOX_FILE, 1 << 20)
    outbox.enqueue("report", lambda seq: b"signed", NOW_MS)
    outbox.close()
    db = sqlite3.connect(directory / OUTBOX_FILE)
    db.executemany(
        "INSERT INTO receipts (seq, leaf_index, tree_size, envelope_sha256, received_ms) VALUES (?, ?, ?, ?, ?)",
        [(3, 40, 41, "aa", NOW_MS), (5, 52, 60, "bb", NOW_MS + 1000)],
    )
    db.commit()
    db.close()
    shown = _shown(directory)
    assert shown["connection"] == (
        "not connected to mid.example:8883 since 2026-11-18 11:06:40Z: [Errno 111] Connection refused"
    )
    assert shown["outbox"] == "1 waiting for a receipt"
    assert shown["last verified receipt"] == "seq 5, leaf 52, 2026-11-18 11:06:41Z"
    assert shown["jobs joined"] == "1 (latest job-7); running job-7"
    assert outbox_state(directory / OUTBOX_FILE).waiting == 1


def test_agent_status_of_a_stopped_daemon_says_so_and_what_was_true_then(tmp_path: Path) -> None:
    directory = _membership(tmp_path)
    pid = _dead_pid()
    assert not daemon_running(pid)
    status = DaemonStatus(pid=pid, broker="mid.example:8883", connected=True, since_ms=NOW_MS)
    write_daemon_status(directory, status)
    assert _shown(directory)["connection"] == (
        "agent not running (when it stopped: connected to mid.example:8883 since 2026-11-18 11:06:40Z)"
    )


@pytest.mark.parametrize("broken", [b"not a database", b""])
def test_an_unreadable_outbox_is_said_not_raised(tmp_path: Path, broken: bytes) -> None:
    path = tmp_path / OUTBOX_FILE
    path.write_bytes(broken)
    state = outbox_state(path)
    assert state.problem.startswith("outbox unreadable") or (state.waiting, state.last_receipt) == (0, None)


def test_a_membership_left_and_receipted_is_not_connected_again_and_status_says_why(tmp_path: Path) -> None:
    """The member left and the MID receipted the leave notice (then revoked the device's broker login): the daemon
    does not open a session for that membership at all (the broker at mid.example is never tried: `run` returns),
    and `agent status` says the connection is closed for good and why."""
    import asyncio

    from edge.agent.config import AgentSettings
    from edge.agent.controls.state import MemberState, save_member_state
    from edge.agent.daemon import MembershipRunner
    from edge.agent.membership import load_membership

    directory = _membership(tmp_path / "agent")
    save_member_state(directory, MemberState(left_ms=NOW_MS))
    Outbox(directory / OUTBOX_FILE, 1 << 20).close()
    db = sqlite3.connect(directory / OUTBOX_FILE)
    db.execute(
        "INSERT INTO receipts (seq, leaf_index, tree_size, envelope_sha256, received_ms, spool_name)"
        " VALUES (9, 77, 80, 'cc', ?, 'leave')",
        (NOW_MS,),
    )
    db.commit()
    db.close()
    runner = MembershipRunner(AgentSettings(data_dir=tmp_path / "agent"), load_membership(directory))

    async def closed_then_stopped() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(runner.run(stop))
        while (status := read_daemon_status(directory)) is None or not status.closed:
            assert not running.done(), running  # it waits for the agent to stop (the member page stays up)
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(running, 30)

    asyncio.run(asyncio.wait_for(closed_then_stopped(), 60))
    assert runner.session is None  # no session, so no reconnect attempts
    connection = _shown(directory)["connection"]
    assert connection.startswith("closed since "), connection
    assert connection.endswith("left the MID; its leave notice was receipted (seq 9, leaf 77), so no broker retries")
