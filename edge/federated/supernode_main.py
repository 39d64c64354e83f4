"""`midgate-supernode`: Flower's SuperNode and its SuperExec in one process.

Flower 1.42 runs a SuperNode's ClientApps through a SuperExec, a process of its own in both isolation modes: the
SuperNode starts one (`--isolation subprocess`) or expects one beside it (`--isolation process`). On a device during a
job that process costs about 25 MB of its own and 4.5 MB more for the warm executor's launcher that stands for it
(BENCHMARKS.md, "Raspberry Pi hub"), on a 512 MB board. Here the SuperExec's loop (`run_superexec`, Flower's own)
runs in a thread of the SuperNode's process, which is `flower-supernode --isolation process` as shipped: the SuperExec
asks the SuperNode's Runtime API for tasks over loopback as before and starts each ClientApp (`flwr-clientapp` by name
from PATH) as before.

Two things a thread changes, both handled here: only the main thread may install signal handlers, so the SuperExec
registers its exit handlers (closing its Runtime API client and its executor) with the SuperNode's, which run them
when the SuperNode exits; and a SuperExec that ends (an error, or Flower's `flwr_exit` raising SystemExit in its
thread) ends the process with SIGTERM, so the SuperNode does not run on without anyone to train its messages.

Takes `flower-supernode`'s arguments; `--isolation process` is required, and the SuperExec connects without TLS to
the Runtime API at `--host`:`--port` (127.0.0.1 only: the API carries the ClientApps' messages in the clear).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

RUNTIME_HOST = "127.0.0.1"


def runtime_api_address(argv: list[str]) -> str:
    """The SuperNode's Runtime API address from its arguments. Requires `--isolation process` and the API on
    127.0.0.1 (`--host`) at an explicit `--port`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--isolation")
    parser.add_argument("--host", default="")
    parser.add_argument("--port", type=int)
    known, _ = parser.parse_known_args(argv)
    if known.isolation != "process" or known.host != RUNTIME_HOST or known.port is None:
        raise SystemExit(
            "midgate-supernode: needs --isolation process --host 127.0.0.1 --port PORT (its SuperExec runs inside it),"
            f" got --isolation {known.isolation} --host {known.host or '-'} --port {known.port}"
        )
    return f"{RUNTIME_HOST}:{known.port}"


def _superexec(address: str, exiting: threading.Event) -> None:
    from flwr.supercore.exit import add_exit_handler
    from flwr.supercore.superexec import run_superexec as superexec_module

    def register_exit_handlers(
        event_type: Any,
        exit_message: str | None = None,
        grpc_servers: list[Any] | None = None,
        bckg_threads: list[threading.Thread] | None = None,
        exit_handlers: list[Callable[[], None]] | None = None,
    ) -> None:
        # In place of Flower's register_signal_handlers (main thread only): the SuperNode's handlers run these. The
        # SuperExec passes no servers or threads (no health server here).
        for handler in exit_handlers or []:
            add_exit_handler(handler)

    superexec_module.register_signal_handlers = register_exit_handlers  # type: ignore[attr-defined]  # not in its __all__
    try:
        superexec_module.run_superexec(runtime_api_address=address, insecure=True)
    except BaseException:
        if not exiting.is_set():
            traceback.print_exc()
    finally:
        if not exiting.is_set():
            print("midgate-supernode: the SuperExec thread ended; ending the SuperNode", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    """`midgate-supernode ARGS`: `flower-supernode ARGS` with its SuperExec in a thread (module docstring)."""
    from flwr.supercore.exit import add_exit_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if {"-h", "--help", "-V", "--version"} & set(sys.argv[1:]):
        flower_supernode()  # Flower's own usage or version, and exit
    address = runtime_api_address(sys.argv[1:])

    exiting = threading.Event()
    add_exit_handler(exiting.set, run_before_force_exit=True)  # the first of Flower's exit handlers to run
    threading.Thread(target=_superexec, args=(address, exiting), name="superexec", daemon=True).start()
    flower_supernode()


if __name__ == "__main__":
    main()
