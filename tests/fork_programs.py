"""Small programs the runtime fork server's test forks (tests/test_runtime_fork_server.py): no torch, so the warm
parent is up in a fraction of a second."""

from __future__ import annotations

import os
import sys
import time

TOUCHED: list[str] = []  # module state a child changes: the next child must not see it


def report() -> None:
    """Print what the child was given, then exit with the status named by its first argument."""
    TOUCHED.append("x")
    print(f"argv={sys.argv} cwd={os.getcwd()} marker={os.environ.get('MARKER')} touched={len(TOUCHED)}")
    print(f"pid={os.getpid()} ppid={os.getppid()}")
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[1]))


def wait() -> None:
    """Run until a signal ends it."""
    print(f"pid={os.getpid()}", flush=True)
    while True:
        time.sleep(0.05)


def prepare(program: str) -> None:
    print(f"prepared {program}", file=sys.stderr, flush=True)
