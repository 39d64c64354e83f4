"""The work behind `midgate agent pause|resume|leave|strike|unstrike|status`, kept apart from typer.

Each command is a pure transition (edge.agent.controls.state) applied to one or every membership's `member.json`
under its lock. The commands never talk to the daemon: a running daemon picks the file up within `member_poll_s`
seconds (edge.agent.controls.watch), and one that is not running reads it when it starts. `status` reads what the
daemon wrote the same way: its status file (edge.agent.daemon_status), the outbox, and the sensors' health in the
sample store.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from edge.agent.config import AgentSettings
from edge.agent.controls.decisions import vote_name
from edge.agent.controls.state import (
    MemberControlError,
    MemberState,
    Strike,
    editing,
    load_member_state,
    save_member_state,
)
from edge.agent.controls.watch import describe
from edge.agent.daemon_status import DaemonStatus, daemon_running, read_daemon_status
from edge.agent.membership import MEMBERSHIP_FILE, OUTBOX_FILE, load_membership
from edge.sensors.errors import StoreNotReadyError
from edge.sensors.store import SampleStore
from protocol.errors import ProtocolError

# rich only for the commands' tables: the member page reads vote_states here, and an agent whose page was visited
# would keep rich resident (BENCHMARKS.md, "Raspberry Pi hub").
if TYPE_CHECKING:
    from rich.table import Table

Transition = Callable[[MemberState, int], MemberState]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def membership_dirs(settings: AgentSettings, mid: str | None) -> list[Path]:
    """The folders of the memberships a command applies to: `mid`, or every enrolled one. Raises ValueError when
    there is none (the message says which MIDs there are)."""
    root = settings.data_dir / "mids"
    enrolled = sorted(p for p in root.iterdir() if (p / MEMBERSHIP_FILE).is_file()) if root.is_dir() else []
    if mid is None:
        if not enrolled:
            raise ValueError(f"no memberships under {root}: run `midgate agent enrol` first")
        return enrolled
    chosen = [p for p in enrolled if p.name == mid]
    if not chosen:
        known = ", ".join(p.name for p in enrolled) or "none"
        raise ValueError(f"not a member of {mid!r} (memberships: {known})")
    return chosen


@dataclass(frozen=True)
class Applied:
    mid: str
    before: MemberState
    after: MemberState

    @property
    def changed(self) -> bool:
        return self.before != self.after


def apply(directory: Path, transition: Transition) -> Applied:
    """Apply `transition` to the membership's member file under its lock; write only when something changed.
    A MemberControlError (refused command, unusable file) propagates and nothing is written."""
    with editing(directory) as before:
        after = transition(before, now_ms())
        if after != before:
            save_member_state(directory, after)
    return Applied(directory.name, before, after)


def parse_until(text: str | None) -> int | None:
    """`--until` as integer ms: ISO 8601 date or date-time; without a zone it is UTC."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--until must be an ISO 8601 date or date-time, found {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@dataclass(frozen=True)
class VoteState:
    """Where a strike's vote (or withdrawal) is: not queued, queued in the outbox, receipted or refused by the MID."""

    where: str
    seq: int | None = None
    leaf_index: int | None = None

    def __str__(self) -> str:
        if self.where == "receipted":
            return f"receipted (seq {self.seq}, leaf {self.leaf_index})"
        if self.where == "queued":
            return f"queued (seq {self.seq})"
        if self.where.startswith("refused"):
            return f"{self.where} (seq {self.seq})"
        return self.where


def vote_states(outbox: Path, names: list[str]) -> dict[str, VoteState]:
    """Read-only look into the outbox for the named votes; the daemon may be writing it at the same time (WAL)."""
    found = {name: VoteState("not queued yet") for name in names}
    if not names or not outbox.exists():
        return found
    try:
        db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5)
        try:
            marks = ",".join("?" * len(names))
            for seq, name in db.execute(f"SELECT seq, spool_name FROM outbox WHERE spool_name IN ({marks})", names):
                found[name] = VoteState("queued", int(seq))
            query = f"SELECT seq, leaf_index, spool_name FROM receipts WHERE spool_name IN ({marks})"
            for seq, leaf, name in db.execute(query, names):
                found[name] = VoteState("receipted", int(seq), int(leaf))
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'refused'").fetchone():
                query = f"SELECT seq, spool_name, reason FROM refused WHERE spool_name IN ({marks})"
                for seq, name, reason in db.execute(query, names):
                    found[name] = VoteState(f"refused by the MID: {reason}", int(seq))
        finally:
            db.close()
    except sqlite3.Error as exc:
        return {name: VoteState(f"outbox unreadable: {exc}") for name in names}
    return found


def _strike_line(strike: Strike, votes: dict[str, VoteState], now: int) -> str:
    span = f"{_when(strike.start_ms)} .. {_when(strike.end_ms) if strike.end_ms else 'withdrawn'}"
    if strike.withdrawn_ms is not None:
        span = f"{_when(strike.start_ms)} .. {_when(strike.withdrawn_ms)} (withdrawn)"
        if votes[vote_name(strike.id, False)].where == "not queued yet":
            state = "withdrawn before its vote was sent: nothing sent"
        else:
            state = f"withdrawal {votes[vote_name(strike.id, True)]}"
    else:
        state = f"vote {votes[vote_name(strike.id, False)]}"
        if strike.end_ms is None:
            span = f"since {_when(strike.start_ms)}"
    active = "active" if strike.active(now) else "over"
    return f"{strike.target_text()}: {active}, {span}; {state}"


@dataclass(frozen=True)
class OutboxState:
    """What the outbox holds, read without disturbing the daemon: reports waiting for their receipt, and the latest
    receipt the daemon verified (seq, leaf index, when)."""

    waiting: int
    last_receipt: tuple[int, int, int] | None
    problem: str = ""


def outbox_state(outbox: Path) -> OutboxState:
    if not outbox.exists():
        return OutboxState(0, None, "no outbox yet")
    try:
        db = sqlite3.connect(f"file:{outbox}?mode=ro", uri=True, timeout=5)
        try:
            waiting = int(db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
            row = db.execute(
                "SELECT seq, leaf_index, received_ms FROM receipts ORDER BY received_ms DESC, seq DESC LIMIT 1"
            ).fetchone()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return OutboxState(0, None, f"outbox unreadable: {exc}")
    return OutboxState(waiting, None if row is None else (int(row[0]), int(row[1]), int(row[2])))


def _connection(status: DaemonStatus | None) -> str:
    if status is None:
        return "agent not run yet (`midgate agent run`)"
    if status.closed:
        return f"closed since {_when(status.since_ms)}: {status.closed}"
    state = f"connected to {status.broker}" if status.connected else f"not connected to {status.broker}"
    said = f"{state} since {_when(status.since_ms)}" + (f": {status.failure}" if status.failure else "")
    if not daemon_running(status.pid):
        return f"agent not running (when it stopped: {said})"
    return said


def _jobs(status: DaemonStatus | None) -> str:
    if status is None or not status.jobs_joined_count:
        return "none"
    latest = f"{status.jobs_joined_count} (latest {status.jobs_joined[-1]})"
    return f"{latest}; running {status.job}" if status.job else latest


def agent_table(directories: list[Path]) -> Table:
    """One row per membership: the device, the daemon's connection to the MID's broker (and why it failed), reports
    waiting in the outbox, the latest verified receipt, jobs joined."""
    from rich.table import Table

    table = Table(title="agent")
    for column in ("MID", "device", "connection", "outbox", "last verified receipt", "jobs joined"):
        table.add_column(column, overflow="fold")
    for directory in directories:
        try:
            device = load_membership(directory).device
        except (OSError, ValueError) as exc:
            table.add_row(directory.name, f"[red]membership unreadable: {exc}[/red]", "-", "-", "-", "-")
            continue
        daemon = read_daemon_status(directory)
        outbox = outbox_state(directory / OUTBOX_FILE)
        receipt = "none yet"
        if outbox.last_receipt is not None:
            seq, leaf, when = outbox.last_receipt
            receipt = f"seq {seq}, leaf {leaf}, {_when(when)}"
        waiting = outbox.problem or f"{outbox.waiting} waiting for a receipt"
        table.add_row(directory.name, device, _connection(daemon), waiting, receipt, _jobs(daemon))
    return table


def status_table(directories: list[Path]) -> Table:
    """One row per membership: what the member chose, each strike and where its vote is."""
    from rich.table import Table

    now = now_ms()
    table = Table(title="member controls")
    for column in ("MID", "choices", "since", "strikes"):
        table.add_column(column, overflow="fold")
    for directory in directories:
        try:
            state = load_member_state(directory)
        except MemberControlError as exc:
            table.add_row(directory.name, f"[red]{exc}[/red]", "-", "-")
            continue
        names = [vote_name(s.id, w) for s in state.strikes for w in (False, True)]
        votes = vote_states(directory / OUTBOX_FILE, names)
        since = _when(state.left_ms if state.left_ms is not None else state.paused_ms)
        strikes = "\n".join(_strike_line(s, votes, now) for s in state.strikes) or "-"
        table.add_row(directory.name, describe(state, now), since, strikes)
    return table


def sensors_table(settings: AgentSettings) -> Table:
    """Each configured sensor's rate, last sample and errors by kind, as the running daemon last wrote them into
    the sample store (read-only: the daemon keeps writing)."""
    from rich.table import Table

    from edge.sensors.readout import health_table

    path = settings.sample_store.path
    if not path.is_file():
        table = Table(title="sensors")
        table.add_column("sample store")
        table.add_row(f"no sample store at {path} yet: `midgate agent run` creates it")
        return table
    try:
        with SampleStore(path, readonly=True) as store:
            reports = store.health()
    except StoreNotReadyError:
        table = Table(title="sensors")
        table.add_column("sample store")
        table.add_row(f"no samples yet: `midgate agent run` is creating {path}")
        return table
    except (ProtocolError, sqlite3.Error) as exc:
        table = Table(title="sensors")
        table.add_column("sample store")
        table.add_row(f"[red]{path} unreadable: {exc}[/red]")
        return table
    return health_table(reports, now_ms(), settings.sensor_health_s)
