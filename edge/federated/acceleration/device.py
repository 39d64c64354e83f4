"""The device's SuperNode with every device-side acceleration (edge.federated.acceleration lists them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edge.federated.acceleration.warm_executor import WarmExecutor
from edge.federated.supernode import SuperNodeProcess

# Flower's SuperExec asks its SuperNode for a task every 1 s by default (`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`); at
# 0.2 s the ClientApp is forked while the SuperNode is still pulling the message (0.3-3 s measured), and it waits for
# the pull (message_wait.py).
SUPEREXEC_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def accelerated(
    process: SuperNodeProcess, directory: Path, log_path: Path | None = None, kept: WarmExecutor | None = None
) -> SuperNodeProcess:
    """`process` (not yet started) run through a warm executor, with the SuperExec's 0.2 s task poll: `kept`, the
    agent's, which outlives the process (started if it is not running), or else a new one of its own in `directory`
    (log `log_path`), stopped with it."""
    return dataclasses.replace(
        process,
        warm=kept if kept is not None else WarmExecutor(directory, log_path=log_path),
        warm_kept=kept is not None,
        extra_env={**(process.extra_env or {}), **SUPEREXEC_ENV},
    )
