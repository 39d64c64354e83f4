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


ONE_PROCESS_ENV = {**SUPEREXEC_ENV, "MALLOC_ARENA_MAX": "2"}
"""A SuperNode whose ClientApps are threads: glibc gives each new thread's allocations an arena of its own (up to 8
per core), so a thread per message would leave the freed memory of each in its own arena; two bound that."""


def in_one_process(process: SuperNodeProcess) -> SuperNodeProcess:
    """`process` (not yet started) as one process, its SuperExec and ClientApps in threads (`midgate-supernode
    --clientapp-threads`), with the SuperExec's 0.2 s task poll: the least memory a job takes, for a device without a
    warm executor kept between jobs (agent.toml `keep_warm_executor = false`)."""
    return dataclasses.replace(process, one_process=True, extra_env={**(process.extra_env or {}), **ONE_PROCESS_ENV})


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
