"""Real Flower Deployment Engine processes for tests and benchmarks: one SuperLink (TLS with a CA made here,
SuperNode authentication) and SuperNodes with their own EC keys, each with its own FLWR_HOME, free ports and a log
file under the test's directory. Everything started here is stopped by `Federation.stop()` by process group id.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mqtt_fixtures import free_port

from coordinator.federation.fleet_front import FleetFrontProcess
from coordinator.federation.flower_cli import FlowerCli
from coordinator.federation.job import JobOutcome
from coordinator.federation.superlink_process import SuperLinkProcess
from coordinator.mid_ca import ServerTls, ensure_mid_ca, issue_server_tls
from edge.federated.acceleration.device import accelerated as accelerated_supernode
from edge.federated.supernode import NodeKey, SuperNodeProcess, generate_node_key
from protocol.tasks.windows import WindowSet, save_window_file, window_fingerprint

APP_DIR = Path(__file__).resolve().parents[1] / "coordinator" / "federation" / "app"


def issue_superlink_tls(
    directory: Path, mid_name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> ServerTls:
    """A MID CA under `directory` (created on first use) and a new SuperLink server certificate for `hosts`."""
    ca = ensure_mid_ca(directory, f"{mid_name} CA")
    return issue_server_tls(ca, directory / "superlink.pem", directory / "superlink.key", list(hosts))


def plaid_windows(split: str = "train") -> WindowSet:
    """PLAID (the real recordings sktime ships, read by edge.sensors.plaid) as plaid-appliance@1 windows."""
    from edge.sensors.plaid import load_plaid

    data = load_plaid(split)  # type: ignore[arg-type]
    x = data.X[:, None, :].astype(np.float32)
    return WindowSet(x=x, y=data.y, fingerprint=window_fingerprint(x, data.y))


def split_indices_by_label(labels: np.ndarray, parts: int, seed: int = 0, alpha: float = 0.5) -> list[np.ndarray]:
    """Non-IID split: each class's items shared among `parts` devices by Dirichlet(alpha) proportions."""
    rng = np.random.default_rng(seed)
    buckets: list[list[int]] = [[] for _ in range(parts)]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * parts))[:-1] * len(idx)).astype(int)
        for bucket, chunk in zip(buckets, np.split(idx, cuts), strict=True):
            bucket.extend(chunk.tolist())
    return [np.array(sorted(bucket), dtype=np.int64) for bucket in buckets]


def split_by_label(windows: WindowSet, parts: int, seed: int = 0, alpha: float = 0.5) -> list[WindowSet]:
    assert windows.y is not None
    out = []
    for sel in split_indices_by_label(windows.y, parts, seed, alpha):
        x, y = windows.x[sel], windows.y[sel]
        out.append(WindowSet(x=x, y=y, fingerprint=window_fingerprint(x, y)))
    return out


def plaid_store_windows(directory: Path, series: np.ndarray) -> WindowSet:
    """The device path end to end: replay the chosen PLAID training recordings into the device's SampleStore
    (edge.sensors), then export plaid-appliance@1's windows from the store as the agent does."""
    from edge.sensors.export import export_task_windows
    from edge.sensors.replay import plaid_replay
    from edge.sensors.store import SampleStore, write_all
    from protocol.tasks.spec import get_task

    directory.mkdir(parents=True, exist_ok=True)
    sensor = plaid_replay(split="train", series=[int(i) for i in series], loop=False)
    with SampleStore(directory / "samples.db") as store:
        store.register(sensor.name, sensor.channels, sensor.class_names, sensor.source)
        write_all(store, sensor.samples(1_795_000_000_000))
        window_set, _ = export_task_windows(
            store, get_task("plaid-appliance", 1), sensor.name, directory / "export.npz"
        )
    return window_set


@dataclass
class Device:
    name: str
    key: NodeKey
    node_id: int | None
    supernode: SuperNodeProcess

    @property
    def spool_dir(self) -> Path:
        return self.supernode.spool_dir

    def start(self) -> None:
        self.supernode.start()

    def pids(self) -> list[int]:
        return self.supernode.pids()


@dataclass
class Federation:
    root: Path
    superlink_env: dict[str, str] = field(default_factory=dict)
    devices: list[Device] = field(default_factory=list)
    superlink: SuperLinkProcess | None = None
    cli: FlowerCli | None = None
    # Devices reach the SuperLink through a fleet front holding empty pulls for this many seconds (None: directly).
    front_hold_s: float | None = None
    front: FleetFrontProcess | None = None

    @property
    def fleet_address(self) -> str:
        """Where the devices' SuperNodes connect: the fleet front when there is one, else the SuperLink."""
        assert self.superlink is not None
        return self.front.address if self.front is not None else self.superlink.address

    def start(self) -> None:
        tls = issue_superlink_tls(self.root / "ca", "test-mid")
        self.superlink = SuperLinkProcess(
            flwr_home=self.root / "superlink",
            tls=tls,
            port=free_port(),
            log_path=self.root / "superlink.log",
            extra_env=self.superlink_env,
        )
        self.superlink.start()
        self.cli = FlowerCli(self.root / "cli", self.superlink.address, tls.ca_cert)
        self.cli.write_config()
        if self.front_hold_s is not None:
            self.front = FleetFrontProcess.beside(
                self.superlink,
                "127.0.0.1",
                free_port(),
                self.root / "front.log",
                hold_s=self.front_hold_s,
                stats_path=self.root / "front-stats.json",
            )
            self.front.start()

    def add_device(
        self,
        name: str,
        windows: WindowSet,
        *,
        register: bool = True,
        accelerated: bool = False,
    ) -> Device:
        """A device with its own key (registered unless `register` is false) and SuperNode, not started yet;
        `accelerated`: its SuperNode runs as the agent's does with Flower acceleration on (edge.federated.acceleration).
        """
        assert self.superlink is not None and self.cli is not None
        home = self.root / name
        key = generate_node_key(home / "keys")
        node_id = self.cli.register_node(key.public_key) if register else None
        data_path = home / "windows.npz"
        save_window_file(data_path, windows)
        supernode = SuperNodeProcess(
            flwr_home=home / "flwr",
            superlink=self.fleet_address,
            ca_cert=self.superlink.tls.ca_cert,
            key=key,
            data_path=data_path,
            spool_dir=home / "spool",
            clientappio_port=free_port(),
            log_path=self.root / f"{name}.log",
        )
        if accelerated:
            supernode = accelerated_supernode(supernode, home / "warm", self.root / f"{name}-warm.log")
        device = Device(name, key, node_id, supernode)
        self.devices.append(device)
        return device

    def submit(self, validation: WindowSet, app_dir: Path = APP_DIR, **overrides: str | int | float) -> int:
        """`flwr run` of the Flower app in `app_dir` (midgate's unless given) for the devices added."""
        assert self.cli is not None
        validation_path = self.root / "validation.npz"
        save_window_file(validation_path, validation)
        config: dict[str, str | int | float] = {
            "selected-nodes": " ".join(str(d.node_id) for d in self.devices if d.node_id is not None),
            "validation-path": str(validation_path),
            "output-dir": str(self.root / "jobs"),
        }
        config.update(overrides)
        return self.cli.submit_run(app_dir, config)

    def run_dir(self, run_id: int) -> Path:
        return self.root / "jobs" / f"run-{run_id}"

    def wait_outcome(self, run_id: int, timeout: float) -> tuple[str, JobOutcome | None]:
        """Polls the SuperLink until the run is finished; returns its status and the ServerApp's outcome."""
        assert self.cli is not None
        status = self.cli.wait_finished(run_id, timeout)
        path = self.run_dir(run_id)
        deadline = time.monotonic() + 10
        while not (path / "outcome.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        outcome = JobOutcome.read(path) if (path / "outcome.json").exists() else None
        return status, outcome

    def stop(self) -> None:
        for device in self.devices:
            with contextlib.suppress(Exception):
                device.supernode.stop()
        if self.front is not None:
            self.front.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def print_logs(self, tail: int = 120) -> None:
        """Printed at teardown; pytest shows it only for failed tests."""
        for log in sorted(self.root.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-tail:]
            print(f"===== {log.name} (last {len(lines)} lines) =====")
            print("\n".join(lines))
        for outcome in sorted(self.root.glob("jobs/*/outcome.json")):
            print(f"===== {outcome} =====\n{json.dumps(json.loads(outcome.read_text()), indent=1)[:4000]}")


@contextlib.contextmanager
def running_federation(root: Path, front_hold_s: float | None = None) -> Iterator[Federation]:
    """A started Federation under `root` (devices through a fleet front holding empty pulls `front_hold_s`, as under
    `serve`; None: directly), stopped and its logs printed when the test ends, also when it fails."""
    fed = Federation(root, front_hold_s=front_hold_s)
    try:
        fed.start()
        yield fed
    finally:
        fed.stop()
        fed.print_logs()
