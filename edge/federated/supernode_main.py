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
when the SuperNode exits; and a SuperExec that ends (an error, or Flower's `flwr_exit`, which here ends only its
thread) ends the process with SIGTERM, so the SuperNode does not run on without anyone to train its messages.

With `--clientapp-threads` (the agent's one-process device, `keep_warm_executor = false`) the process also imports
torch and the ClientApp before it joins, and the SuperExec runs each ClientApp task in a thread through Flower's own
`run_clientapp` (`ClientAppThreads`): Flower's `flwr_exit` and `register_signal_handlers`, as `run_clientapp` and
`run_superexec` look them up, end only the calling thread and keep its exit handlers to it. And before Flower is
imported a placeholder stands for its SQL object store module, which a SuperNode never uses
(`_without_sql_object_store`).

Takes `flower-supernode`'s arguments; `--isolation process` is required, and the SuperExec connects without TLS to
the Runtime API at `--host`:`--port` (127.0.0.1 only: the API carries the ClientApps' messages in the clear).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable
from typing import Any, NoReturn

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


CLIENTAPP_THREADS = "--clientapp-threads"
"""midgate-supernode's own flag (taken out before Flower reads the arguments): ClientApps run in threads."""
PRELOAD = ("torch", "edge.federated.client_app")
"""What a SuperNode whose ClientApps run in its threads imports before it joins: what its first message needs."""


SQL_OBJECT_STORE = "flwr.supercore.object_store.sql_object_store"


def _without_sql_object_store() -> None:
    """A placeholder for Flower's SQL object store module, before Flower is imported. A SuperNode keeps its object
    store in memory (flwr 1.42 `flower_supernode`: `ObjectStoreFactory()`, whose default is the in-memory store), yet
    the factory's module imports the SQL store, and through it SQLAlchemy and Alembic: 29 MB of a device's memory
    during a job (BENCHMARKS.md, "Raspberry Pi hub"). Using the placeholder's `SqlObjectStore` raises."""
    if SQL_OBJECT_STORE in sys.modules:
        return  # imported already (a warm parent's preload): nothing to save
    placeholder = types.ModuleType(SQL_OBJECT_STORE, "midgate-supernode's placeholder: the SQL object store unused")

    class SqlObjectStore:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("midgate-supernode keeps Flower's object store in memory; the SQL store is not imported")

    placeholder.SqlObjectStore = SqlObjectStore  # type: ignore[attr-defined]
    sys.modules[SQL_OBJECT_STORE] = placeholder


class _ThreadExit(Exception):
    """Flower's `flwr_exit` in one of this process's threads: it must neither run the process's exit handlers (the
    SuperNode's) nor raise SystemExit there, only end that thread with the code."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


_handlers = threading.local()  # one ClientApp thread's exit handlers, which Flower would run at its process's exit


RegisterSignalHandlers = Callable[..., None]


def _registrar(keep: Callable[[Callable[[], None]], None]) -> RegisterSignalHandlers:
    """In place of Flower's register_signal_handlers (flwr.supercore.exit) in a thread, where signal handlers cannot
    be installed (only the main thread may): one with its signature that only keeps the exit handlers, by `keep`.
    Flower passes no servers or threads to it from the SuperExec or a ClientApp."""

    def register_signal_handlers(
        event_type: Any,
        exit_message: str | None = None,
        grpc_servers: list[Any] | None = None,
        bckg_threads: list[threading.Thread] | None = None,
        exit_handlers: list[Callable[[], None]] | None = None,
    ) -> None:
        for handler in exit_handlers or []:
            keep(handler)

    return register_signal_handlers


def _keep_for_this_thread(handler: Callable[[], None]) -> None:
    _handlers.exit = [*getattr(_handlers, "exit", []), handler]


def _keep_for_the_process(handler: Callable[[], None]) -> None:
    from flwr.supercore.exit import add_exit_handler

    add_exit_handler(handler)  # the SuperNode's handlers run it when the process exits


_register_thread_exit_handlers = _registrar(_keep_for_this_thread)
"""A ClientApp thread's: its handlers are run by `_thread_exit` when Flower ends the task."""
_register_superexec_exit_handlers = _registrar(_keep_for_the_process)
"""The SuperExec thread's: its handlers (closing its Runtime API client and executor) run at the process's exit."""


def _thread_exit(
    code: int,
    message: str | None = None,
    event_type: Any = None,
    event_details: dict[str, Any] | None = None,
    *,
    emit_telemetry: bool = True,
) -> NoReturn:
    """In place of Flower's flwr_exit in a thread: say what Flower says, run this thread's exit handlers (last
    registered first), end the thread."""
    from flwr.supercore import log

    failed = not 0 <= code < 100
    log(logging.ERROR if failed else logging.DEBUG, f"Exit Code: {code}\n{message or ''}" if failed else message or "")
    _run_exit_handlers()
    raise _ThreadExit(code)


def _run_exit_handlers() -> None:
    """This thread's exit handlers, last registered first, each once; one that fails does not stop the others."""
    handlers, _handlers.exit = getattr(_handlers, "exit", []), []
    for handler in reversed(handlers):
        with contextlib.suppress(Exception):  # as Flower's trigger_exit_handlers
            handler()


class ClientAppThreads:
    """A SuperExec executor (flwr.supercore.superexec.executor.types.Executor) that runs each ClientApp task in a
    thread of this process, through Flower's own `run_clientapp`, rather than as a `flwr-clientapp` process: what a
    ClientApp process costs of its own (its interpreter, its copies of torch's and Flower's pages) is not paid per
    message. Each thread first waits until the SuperNode's log shows its message pulled (message_wait.py), as a
    forked ClientApp does."""

    def get_eligible_capacity(
        self, supported_task_types: set[Any], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[Any], set[str]]:
        return supported_task_types, set()

    def wait_for_capacity(
        self,
        task_type: Any = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"midgate-supernode runs ClientApps only, not {spec.task_type}")
        threading.Thread(target=_clientapp, args=(spec,), name=f"clientapp-{spec.task_id}", daemon=True).start()
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        return None  # nothing to keep: a task's thread ends with its task

    def close(self) -> None:
        return None


def _clientapp(spec: Any) -> None:
    from flwr.supernode.runtime import run_clientapp as clientapp_module

    from edge.federated.acceleration.message_wait import wait_for_message

    waited = wait_for_message(1)
    print(f"midgate-supernode: ClientApp task {spec.task_id} started after {waited:.3f} s waiting for its message",
          flush=True)  # fmt: skip
    try:
        clientapp_module.run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            runtime_dependency_install=False,
        )
    except _ThreadExit as done:
        print(f"midgate-supernode: ClientApp task {spec.task_id} ended with exit code {done.code}", flush=True)
    except BaseException:
        traceback.print_exc()
    finally:
        _run_exit_handlers()  # left by a task that raised before Flower's exit: its heartbeat and client end here


def _use_in_threads(clientapp_threads: bool) -> None:
    """Flower's SuperExec (and, with `clientapp_threads`, its ClientApp runtime) as this process's threads run them:
    the module globals their functions look up (flwr 1.42: `register_signal_handlers`, `flwr_exit`, and the SuperExec's
    `get_executor`) replaced in those two modules only; the SuperNode's own, in the main thread, are Flower's."""
    from flwr.supercore.superexec import run_superexec as superexec_module

    superexec_module.register_signal_handlers = _register_superexec_exit_handlers  # type: ignore[attr-defined]
    superexec_module.flwr_exit = _thread_exit  # type: ignore[attr-defined]
    if clientapp_threads:
        from flwr.supernode.runtime import run_clientapp as clientapp_module

        clientapp_module.register_signal_handlers = _register_thread_exit_handlers  # type: ignore[attr-defined]
        clientapp_module.flwr_exit = _thread_exit  # type: ignore[attr-defined]
        superexec_module.get_executor = lambda *args, **kwargs: ClientAppThreads()  # type: ignore[attr-defined]


def _superexec(address: str, exiting: threading.Event) -> None:
    from flwr.supercore.superexec import run_superexec as superexec_module

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
    """`midgate-supernode [--clientapp-threads] ARGS`: `flower-supernode ARGS` with its SuperExec in a thread, and
    with `--clientapp-threads` its ClientApps in threads too, torch and the ClientApp imported first (module
    docstring)."""
    clientapp_threads = CLIENTAPP_THREADS in sys.argv[1:]
    sys.argv = [arg for arg in sys.argv if arg != CLIENTAPP_THREADS]
    _without_sql_object_store()
    from flwr.supercore.exit import add_exit_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if {"-h", "--help", "-V", "--version"} & set(sys.argv[1:]):
        flower_supernode()  # Flower's own usage or version, and exit
    address = runtime_api_address(sys.argv[1:])
    if clientapp_threads:
        for module in PRELOAD:
            importlib.import_module(module)
    _use_in_threads(clientapp_threads)
    exiting = threading.Event()
    add_exit_handler(exiting.set, run_before_force_exit=True)  # the first of Flower's exit handlers to run
    threading.Thread(target=_superexec, args=(address, exiting), name="superexec", daemon=True).start()
    flower_supernode()


if __name__ == "__main__":
    main()
