"""The `flwr` CLI calls the coordinator makes against its SuperLink: register a device's key, submit a run, read
its status, stop a run. `flwr run` exits 0 even when the ServerApp fails, so run
completion is read from `flwr ls` (and from the ServerApp's outcome.json), never from the CLI's exit code.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.federation.superlink_process import flower_env, flower_executable

CONNECTION = "midgate"
TERMINAL_PREFIX = "finished"


class FlowerCliError(RuntimeError):
    pass


@dataclass(frozen=True)
class FlowerCli:
    """The `flwr` CLI with its own FLWR_HOME holding one connection, `midgate`, to the SuperLink over TLS."""

    flwr_home: Path
    address: str
    ca_cert: Path

    def write_config(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.ca_cert}"\n'
        )

    def _run(self, *args: str, timeout: float = 120.0) -> str:
        proc = subprocess.run(
            [flower_executable("flwr"), *args],
            capture_output=True,
            env=flower_env(self.flwr_home),
            timeout=timeout,
            check=False,
        )
        out = proc.stdout.decode(errors="replace")
        if proc.returncode != 0:
            raise FlowerCliError(
                f"flwr {args[0]} exited {proc.returncode}: {out[-2000:]} {proc.stderr.decode()[-2000:]}"
            )
        return out

    @staticmethod
    def _json(out: str) -> dict[str, object]:
        start = out.find("{")
        if start < 0:
            raise FlowerCliError(f"no JSON in flwr output: {out[-500:]}")
        value = json.loads(out[start:])
        if not isinstance(value, dict) or value.get("success") is False:
            raise FlowerCliError(f"flwr reported failure: {out[-1000:]}")
        return value

    def register_node(self, public_key: Path) -> int:
        """Register a SuperNode's EC public key (OpenSSH format); returns its node id."""
        data = self._json(self._run("supernode", "register", str(public_key), CONNECTION, "--format", "json"))
        return int(str(data["node-id"]))

    def submit_run(self, app_dir: Path, run_config: dict[str, str | int | float]) -> int:
        pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        data = self._json(self._run("run", str(app_dir), CONNECTION, "--run-config", pairs, "--format", "json"))
        return int(str(data["run-id"]))

    def run_status(self, run_id: int) -> str:
        data = self._json(self._run("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))
        runs = data.get("runs")
        if not isinstance(runs, list) or not runs:
            raise FlowerCliError(f"run {run_id} not listed")
        return str(runs[0]["status"])

    def stop_run(self, run_id: int) -> None:
        self._run("stop", str(run_id), CONNECTION)

    def wait_finished(self, run_id: int, timeout: float, poll: float = 1.0) -> str:
        """Poll the run's status until it is `finished:*`; returns that status (e.g. finished:completed)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_status(run_id)
            if status.startswith(TERMINAL_PREFIX) or time.monotonic() >= deadline:
                return status
            time.sleep(poll)
