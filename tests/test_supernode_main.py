"""`midgate-supernode` (edge/federated/supernode_main.py): Flower's SuperNode with its SuperExec in a thread, and with
`--clientapp-threads` its ClientApps too. Jobs run through it in tests/test_fl_deployment.py (forked by the warm
executor) and in the agent e2e tests whose agents keep no warm executor (one process); here what it refuses, that a
SuperExec thread that ends takes the SuperNode with it rather than leaving a node nobody trains on, and that Flower's
exit in a ClientApp thread ends that thread alone."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from mqtt_fixtures import free_port

from edge.federated.supernode_main import runtime_api_address

SCRIPTS = Path(sys.executable).parent
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0"}


def _args(port: int) -> list[str]:
    return ["--superlink", "127.0.0.1:9", "--insecure", "--isolation", "process", "--host", "127.0.0.1", "--port",
            str(port)]  # fmt: skip


@pytest.mark.slow  # a real process
def test_it_needs_process_isolation_and_its_runtime_api_on_loopback_at_a_port() -> None:
    assert runtime_api_address(_args(9101)) == "127.0.0.1:9101"
    for wrong in (
        ["--isolation", "subprocess", "--host", "127.0.0.1", "--port", "9101"],  # Flower would start a SuperExec too
        ["--isolation", "process", "--host", "0.0.0.0", "--port", "9101"],  # the Runtime API is not TLS
        ["--isolation", "process", "--host", "127.0.0.1"],
    ):
        with pytest.raises(SystemExit, match=r"needs --isolation process --host 127\.0\.0\.1 --port PORT"):
            runtime_api_address(wrong)
    refused = subprocess.run(
        [str(SCRIPTS / "midgate-supernode"), "--superlink", "127.0.0.1:9", "--insecure"],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **FLOWER_ENV},
    )  # fmt: skip
    assert refused.returncode == 1 and "needs --isolation process" in refused.stderr


@pytest.mark.slow  # a real process
def test_a_superexec_thread_that_ends_ends_the_supernode(tmp_path: Path) -> None:
    # Flower's SuperExec loop replaced by one that fails at once; the SuperNode alone would retry its SuperLink for
    # ever, so only the thread's end can end this process.
    program = (
        "import sys\n"
        "from flwr.supercore.superexec import run_superexec as module\n"
        "def failing(**kwargs):\n"
        "    raise RuntimeError('the Runtime API refused us')\n"
        "module.run_superexec = failing\n"
        "from edge.federated.supernode_main import main\n"
        f"sys.argv = ['midgate-supernode', *{_args(free_port())!r}]\n"
        "main()\n"
    )
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(tmp_path / "home")}
    ended = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, env=env)
    output = ended.stdout + ended.stderr
    assert "RuntimeError: the Runtime API refused us" in output, output
    assert "midgate-supernode: the SuperExec thread ended; ending the SuperNode" in output, output
    # SIGTERM: Flower's graceful exit once its handler is in place, the default action before (here, at once).
    assert ended.returncode in (-15, 0), output


def test_flowers_exit_in_a_clientapp_thread_runs_that_threads_handlers_only_and_ends_the_thread() -> None:
    from flwr.supercore.exit import exit_handler

    from edge.federated.supernode_main import _register_thread_exit_handlers, _thread_exit, _ThreadExit

    process_handlers = list(exit_handler.registered_exit_handlers)  # the SuperNode's, which must not run here
    ran: list[str] = []
    ended: list[int] = []

    def clientapp(name: str) -> None:
        _register_thread_exit_handlers(None, exit_handlers=[lambda: ran.append(f"{name} first")])
        _register_thread_exit_handlers(None, exit_handlers=[lambda: ran.append(f"{name} second")])
        try:
            _thread_exit(0)
        except _ThreadExit as done:
            ended.append(done.code)

    for name in ("a", "b"):  # one after the other, as a SuperNode's messages come
        thread = threading.Thread(target=clientapp, args=(name,))
        thread.start()
        thread.join()
    assert ran == ["a second", "a first", "b second", "b first"]  # last registered first, each thread its own
    assert ended == [0, 0] and exit_handler.registered_exit_handlers == process_handlers


def test_the_clientapp_executor_launches_clientapps_only() -> None:
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResultStatus

    from edge.federated.supernode_main import ClientAppThreads

    spec = ExecutionSpec(task_type=TaskType.SERVER_APP, runtime_api_address="127.0.0.1:9", token="t", insecure=True,
                         root_certificates_path=None, runtime_dependency_install=False, parent_pid=None,
                         suppress_output=False, task_id=7)  # fmt: skip
    result = ClientAppThreads().launch(spec)
    assert result.status is LaunchResultStatus.FAILED and "ClientApps only" in (result.message or "")


@pytest.mark.slow  # a fresh interpreter
def test_the_supernode_imports_no_sql_store_and_keeps_its_objects_in_memory() -> None:
    """Flower's SuperNode keeps its object store in memory, so the placeholder for the SQL store (and SQLAlchemy and
    Alembic, 29 MB) is never used: checked against the Flower installed, in case a release changes either."""
    program = (
        "import sys\n"
        "from edge.federated.supernode_main import _without_sql_object_store\n"
        "_without_sql_object_store()\n"
        "import flwr.supernode.cli.flower_supernode, flwr.supernode.runtime.run_clientapp\n"
        "import flwr.supercore.superexec.run_superexec, edge.federated.client_app\n"
        "from flwr.supercore.object_store import ObjectStoreFactory\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'alembic'}))\n"
        "print(type(ObjectStoreFactory().store()).__name__)\n"
    )
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["[]", "InMemoryObjectStore"]
    spec = importlib.util.find_spec("flwr.supernode.cli.flower_supernode")
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).read_text()
    assert "ObjectStoreFactory()" in source  # the SuperNode's store: the factory's default, in memory


def test_a_clientapp_task_that_raises_before_flowers_exit_still_runs_its_exit_handlers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower ends a task's heartbeat and client in the exit handlers it registers; a task that raised before
    Flower's exit (here, at once) must not leave them running for a task that is gone."""
    from flwr.supernode.runtime import run_clientapp as clientapp_module

    from edge.federated.supernode_main import _clientapp, _register_thread_exit_handlers

    ended: list[str] = []

    def raising(**kwargs: object) -> None:
        _register_thread_exit_handlers(None, exit_handlers=[lambda: ended.append("heartbeat stopped, client closed")])
        raise KeyboardInterrupt("not an Exception: Flower's own handler would not catch it")

    monkeypatch.setattr(clientapp_module, "run_clientapp", raising)
    spec = SimpleNamespace(task_id=3, runtime_api_address="127.0.0.1:9", token="t", insecure=True)
    thread = threading.Thread(target=_clientapp, args=(spec,))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive() and ended == ["heartbeat stopped, client closed"]
