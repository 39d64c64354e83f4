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


def accelerated(process: SuperNodeProcess, directory: Path, log_path: Path | None = None) -> SuperNodeProcess:
    """`process` (not yet started) run through a warm executor in `directory` (log `log_path`), with the SuperExec's
    0.2 s task poll."""
    return dataclasses.replace(
        process,
        warm=WarmExecutor(directory, log_path=log_path),
        extra_env={**(process.extra_env or {}), **SUPEREXEC_ENV},
    )
