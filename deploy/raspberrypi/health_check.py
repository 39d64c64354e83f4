"""install.sh's health check of an installed agent, run with the venv's Python as the agent's user.

Exit 0 when the agent is sound: before enrolment, its config loads and every module the agent imports does; once
enrolled, `midgate-agent` (what the systemd unit runs: `midgate agent run` without the CLI stack) with that config
says READY=1 on a notify socket, as it does to systemd (edge/agent/systemd_notify.py), within the timeout. Otherwise
exit 1 with the reason and the agent's last output.
Usage: python health_check.py CONFIG TIMEOUT_S
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def ready_within(config: Path, timeout_s: float) -> tuple[bool, str]:
    """Run `midgate-agent` until READY=1 (True) or its exit or the timeout (False); stop it either way."""
    agent_command = Path(sys.executable).parent / "midgate-agent"
    with tempfile.TemporaryDirectory() as tmp, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        address = os.path.join(tmp, "notify")
        sock.bind(address)
        sock.settimeout(1.0)
        log = Path(tmp) / "agent.log"
        with log.open("wb") as out:
            agent = subprocess.Popen(
                [str(agent_command), "--config", str(config)],
                env={**os.environ, "NOTIFY_SOCKET": address},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            ready = False
            try:
                for _ in range(int(timeout_s)):
                    if agent.poll() is not None:
                        break
                    try:
                        ready = b"READY=1" in sock.recv(4096)
                    except TimeoutError:
                        continue
                    if ready:
                        break
            finally:
                if agent.poll() is None:
                    agent.send_signal(signal.SIGTERM)
                    try:
                        agent.wait(30)
                    except subprocess.TimeoutExpired:
                        agent.kill()
                        agent.wait()
        return ready, log.read_text(errors="replace")[-4000:]


def main(config: Path, timeout_s: float) -> int:
    try:
        # Every module the agent needs at its start, and those it imports only when a job starts or the member
        # page is visited (edge.agent.job_node, edge.agent.member_page): a broken install shows here, not mid-job.
        import edge.agent.daemon
        import edge.agent.job_task
        import edge.agent.member_page_view
        import edge.agent.run
        import edge.federated.acceleration.device
        import edge.federated.supervisor  # noqa: F401
        from edge.agent.config import AgentSettings
        from edge.agent.membership import load_memberships

        settings = AgentSettings.load(config)
        enrolled = bool(load_memberships(settings.data_dir / "mids"))
    except Exception as error:  # anything at all: this is the check
        print(f"health check: the agent cannot start: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if not enrolled:
        print("health check: config and modules load (not enrolled yet)")
        return 0
    ready, output = ready_within(config, timeout_s)
    if not ready:
        print(f"health check: `midgate-agent` was not ready within {timeout_s:.0f} s:\n{output}", file=sys.stderr)
        return 1
    print("health check: `midgate-agent` is ready")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), float(sys.argv[2])))
