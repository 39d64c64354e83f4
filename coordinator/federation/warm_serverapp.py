"""The MID's warm ServerApp: each job's `flwr-serverapp` forked from a parent that already imported it.

The SuperLink's SuperExec starts a fresh `flwr-serverapp` process for every run; that process imports Flower's
SuperLink package (linkstate, SQLAlchemy, Alembic) and then midgate's ServerApp (torch) before its first request:
about 5 s of CPU, 6-14 s from a job's submission to `run_job` on this loaded 2-core machine (BENCHMARKS.md, "A job's
time outside its rounds"). `serve` instead keeps one warm parent (runtime.fork_server) beside its SuperLink, started
with the SuperLink's environment, that imported Flower's own entry point
(`flwr.superlink.cli.flwr_serverapp.flwr_serverapp`), torch and coordinator.federation.server_app; the SuperLink's
PATH starts with the fork server's launcher, so the SuperExec's `flwr-serverapp` (looked up by name) is forked from
it with the SuperExec's argv (token, address, --parent-pid), environment and streams, and the launcher exits with
the ServerApp's status. A forked ServerApp has run nothing before its `main`: Flower's state, its log upload and its
exit are a fresh process's. If the parent is not up yet, dead or does not answer, the launcher says so in the
SuperLink's log and starts `flwr-serverapp` the ordinary way.
"""

from __future__ import annotations

import os
from pathlib import Path

from runtime.fork_server import ForkServer, ForkTable

SERVERAPP_TABLE = ForkTable(
    entry_points={"flwr-serverapp": "flwr.superlink.cli.flwr_serverapp:flwr_serverapp"},
    preload=("torch", "coordinator.federation.server_app"),
)


def warm_serverapp(directory: Path, env: dict[str, str]) -> ForkServer:
    """The warm parent's handle: launchers in `directory/bin`, its log `directory/warm.log`, run with `env` (the
    SuperLink's, so that what Flower reads at import is what a fresh ServerApp would read)."""
    return ForkServer(directory, SERVERAPP_TABLE, log_path=directory / "warm.log", env=env)


def warm_path(directory: Path, path: str) -> str:
    """`path` (a PATH value) with the warm parent's launchers first."""
    return os.pathsep.join([str(directory / "bin"), path]) if path else str(directory / "bin")
