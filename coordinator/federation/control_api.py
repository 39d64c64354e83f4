"""The SuperLink's Control API, called in process: submit a run, read its status, stop it.

`flwr run`, `flwr ls` and `flwr stop` are each a fresh Python process importing Flower's CLI: 1.5-3.5 s per call
measured on the 2-core machine (7 s under load), taken from the job when the SuperLink shares the machine. This
client makes the same requests with Flower's own client (flwr.supercore.control.ControlHttpClient, the CLI's, over
TLS trusting the MID CA) and builds the app's FAB with Flower's own builder (flwr.cli.build), once per command:
Flower is neither copied nor patched. Importing them costs about as much as one CLI call (Flower's package imports
FastAPI and numpy), so `prepare` does it in a worker thread while `job start` connects to the broker and invites
the devices. The requests are the CLI's: `StartRun` with the FAB and the run config as
override config (no federation: the SuperLink's default), `ListRuns` for one run id, `StopRun`.

`flwr run` exits 0 even when the ServerApp fails, and so does `StartRun`: a run's result is its status here
(`finished:completed`) together with the ServerApp's outcome.json, never the submission's success.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:  # Flower's client is imported when first used: `job list` and `job show` never need it
    from flwr.supercore.control import ControlHttpClient

T = TypeVar("T")

COMPONENT = "midgate job start"
"""How the requests name their sender to the SuperLink (Flower's runtime-version headers)."""


class RunControlError(RuntimeError):
    """The SuperLink refused a request or could not be reached; the message says which and why."""


class RunControl(Protocol):
    """What `job start` asks of the SuperLink (ControlApi; coordinator.federation.flower_cli.FlowerCli too)."""

    def submit_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int: ...

    def run_status(self, run_id: int) -> str: ...

    def stop_run(self, run_id: int) -> None: ...


@dataclass
class ControlApi:
    """The Control API of the SuperLink at `address` (host:port), trusted through `ca_cert` (the MID CA).

    One HTTP client for every request (opened at the first, closed by `close`)."""

    address: str
    ca_cert: Path
    _client: ControlHttpClient | None = field(default=None, init=False, repr=False)
    _fabs: dict[Path, Future[bytes]] = field(default_factory=dict, init=False, repr=False)
    _worker: ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    def prepare(self, app_dir: Path) -> None:
        """Import Flower's client and build the FAB of `app_dir` in a worker thread, for a `submit_run` to come."""
        if app_dir not in self._fabs:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control-api")
            self._fabs[app_dir] = self._worker.submit(self._build, app_dir)

    def _build(self, app_dir: Path) -> bytes:
        from flwr.cli.build import build_fab_from_disk

        self._control()
        return build_fab_from_disk(app_dir)

    def _control(self) -> ControlHttpClient:
        if self._client is None:
            from flwr.supercore.control import ControlHttpClient
            from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

            self._client = ControlHttpClient.from_server_address(
                server_address=self.address,
                insecure=False,
                root_certificates=self.ca_cert.read_bytes(),
                interceptors=[RuntimeVersionHttpInterceptor(component_name=COMPONENT)],
            )
        return self._client

    def submit_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        """Start a run of the Flower app in `app_dir` with `run_config` (keys and values as in the app's
        `[tool.flwr.app.config]`); returns its run id. Raises RunControlError."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        self.prepare(app_dir)
        content = self._fabs[app_dir].result()
        fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
        request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(dict(run_config)))
        response = self._call("StartRun", lambda control: control.StartRun(request))
        if not response.HasField("run_id"):
            raise RunControlError(f"the SuperLink started no run: {response.note if response.HasField('note') else ''}")
        return int(response.run_id)

    def run_status(self, run_id: int) -> str:
        """The run's status as `flwr ls` prints it: `pending`, `starting`, `running`, or `finished:<sub-status>`
        (`finished:completed`, `finished:failed`, `finished:stopped`). Raises RunControlError (an unknown run too)."""
        from flwr.proto.control_pb2 import ListRunsRequest

        response = self._call("ListRuns", lambda control: control.ListRuns(ListRunsRequest(run_id=run_id)))
        if run_id not in response.run_dict:
            raise RunControlError(f"run {run_id} not listed")
        status = response.run_dict[run_id].status
        return f"{status.status}:{status.sub_status}" if status.sub_status else str(status.status)

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop the run. Raises RunControlError (a finished run included)."""
        from flwr.proto.control_pb2 import StopRunRequest

        response = self._call("StopRun", lambda control: control.StopRun(StopRunRequest(run_id=run_id)))
        if not response.success:
            raise RunControlError(f"the SuperLink did not stop run {run_id}")

    def _call(self, name: str, request: Callable[[ControlHttpClient], T]) -> T:
        import httpx

        try:
            return request(self._control())
        except httpx.HTTPStatusError as exc:
            said = exc.response.text[:500]
            raise RunControlError(f"{name} refused with HTTP {exc.response.status_code}: {said}") from None
        except httpx.HTTPError as exc:
            raise RunControlError(f"{name} failed: {type(exc).__name__}: {exc}") from None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
        if self._client is not None:
            self._client.close()
            self._client = None
