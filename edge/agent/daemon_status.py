"""What the running daemon tells `midgate agent status` about one membership: whether it is connected to the MID's
broker (and if not, why the last attempt failed), the job whose SuperNode runs, the jobs it joined.

`{data_dir}/mids/{mid}/daemon-status.json` (0600), replaced atomically (edge.durable_file) whenever what it says
changes, never on a timer: a Pi's SD card is written once per change of connection or job, not once a second. The
status command reads it from its own process and checks that the daemon that wrote it (`pid`) still runs; the file
of a stopped daemon says what was true when it stopped. Jobs joined are carried over from the previous file when the
daemon starts, so the count survives restarts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.durable_file import replace_file
from protocol.messages import Ident

STATUS_FILE = "daemon-status.json"
MAX_STATUS_FILE = 64 * 1024
MAX_JOBS_KEPT = 64
"""Job ids listed in the file (the latest ones); `jobs_joined_count` counts them all."""


class DaemonStatus(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    pid: int
    broker: str
    """`host:port` the session connects to, with " (TLS)" or " (through a hub)" (edge.agent.session.BrokerRoute)."""
    connected: bool
    since_ms: int
    """When `connected` took its value."""
    failure: str = ""
    """Why the latest connection attempt failed or the connection was lost ("" once connected again)."""
    job: Ident | None = None
    """The job whose SuperNode runs now."""
    jobs_joined: Annotated[tuple[Ident, ...], Field(max_length=MAX_JOBS_KEPT)] = ()
    """The latest jobs this agent started a SuperNode for, oldest first."""
    jobs_joined_count: int = 0
    closed: str = ""
    """Why the daemon closed this membership's connection for good and stopped retrying it (the member left and the
    MID receipted the leave notice); "" while it keeps one."""


def read_daemon_status(directory: Path) -> DaemonStatus | None:
    """The membership's status file; None when there is none or it cannot be read (a daemon never ran, or an
    unreadable file: the status command says so rather than guess)."""
    path = directory / STATUS_FILE
    try:
        if path.stat().st_size > MAX_STATUS_FILE:
            return None
        return DaemonStatus.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None


def write_daemon_status(directory: Path, status: DaemonStatus) -> None:
    replace_file(directory / STATUS_FILE, status.model_dump_json().encode())


def with_job(status: DaemonStatus, job: str | None) -> DaemonStatus:
    """`status` with `job` running now; a job not seen before counts as joined."""
    if job is None or job in status.jobs_joined:
        return status.model_copy(update={"job": job})
    joined = (*status.jobs_joined, job)[-MAX_JOBS_KEPT:]
    count = status.jobs_joined_count + 1
    return status.model_copy(update={"job": job, "jobs_joined": joined, "jobs_joined_count": count})


def daemon_running(pid: int) -> bool:
    """A process with this pid exists (it may belong to another user: then it exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = ["STATUS_FILE", "DaemonStatus", "daemon_running", "read_daemon_status", "with_job", "write_daemon_status"]
