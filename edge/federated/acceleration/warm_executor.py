"""A warm executor for the device's Flower processes: forks them from a parent that already imported torch.

With Flower's defaults every train message starts a fresh `flwr-clientapp` process that spends about 4 s importing
torch before it trains for a fraction of a second. The agent instead keeps a warm parent (runtime.fork_server) that
imports torch, Flower and the midgate ClientApp once and then forks a child per request. Flower is used as shipped:
its SuperExec launches `flwr-clientapp` by name from PATH, and the SuperExec's PATH starts with the fork server's
launchers, which ask the warm parent to fork the real Flower entry point
(`flwr.supernode.cli.flwr_clientapp.flwr_clientapp`). The SuperNode, with its SuperExec in a thread
(`midgate-supernode`, edge/federated/supernode_main.py), is forked the same way, so every Flower process of the
device shares the one copy of torch, numpy and Flower in memory.

What is the device's here: which Flower programs are forked, what is preloaded, and that a forked ClientApp first
waits until the SuperNode's log shows its message pulled (message_wait.py). The mechanism is runtime.fork_server's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge.federated.acceleration.message_wait import wait_for_message
from runtime.fork_server import ForkServer, ForkTable
from runtime.fork_server import install_launchers as _install_launchers
from runtime.fork_server import main as _fork_server_main

ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "flwr-clientapp": ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    "midgate-supernode": ("edge.federated.supernode_main", "main"),
}
# Not torch._dynamo: the ClientApp trains with protocol.tasks.models.PlainAdam, which never imports it (torch.optim's
# optimisers do: about 800 modules and 70 MB that every process forked from here would carry).
PRELOAD = ("torch", "edge.federated.client_app")
MODULE = "edge.federated.acceleration.warm_executor"


def prepare_child(program: str) -> None:
    """In a forked child, before Flower's entry point: a ClientApp waits for the message it was started for."""
    if program == "flwr-clientapp":
        waited = wait_for_message(1)
        print(f"midgate warm executor: ClientApp started after {waited:.3f} s waiting for its message", flush=True)


DEVICE_TABLE = ForkTable(
    entry_points={name: f"{module}:{attr}" for name, (module, attr) in ENTRY_POINTS.items()},
    preload=PRELOAD,
    prepare=f"{MODULE}:prepare_child",
)


def install_launchers(bin_dir: Path, socket_path: Path) -> Path:
    """Write one launcher per Flower entry point into `bin_dir`; put `bin_dir` first on PATH to use them."""
    return _install_launchers(bin_dir, socket_path, list(ENTRY_POINTS))


@dataclass
class WarmExecutor(ForkServer):
    """The agent's handle on one warm parent (runtime.fork_server.ForkServer with the device's table).

    The agent keeps one warm parent per membership from its start to its stop when `keep_warm_executor` is on
    (edge.agent.job_node): a job's SuperNode then starts at once instead of after the parent's imports, and
    `stop_children()` ends what a job forked while the parent stays. `ensure_started()` is what both the agent's
    warm-up and a job's SuperNode call: one start at a time, none while the parent lives."""

    table: ForkTable = field(default=DEVICE_TABLE)
    module: str = MODULE


def main() -> None:
    _fork_server_main(DEVICE_TABLE)


if __name__ == "__main__":
    main()
