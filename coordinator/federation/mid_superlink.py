"""The MID's SuperLink as `serve` runs it: TLS from the MID's CA (the CA devices receive at enrolment), its own
FLWR_HOME under the data folder, the fleet front devices connect through (the SuperLink itself then listens on
loopback only), and the `flwr` CLI connection the coordinator uses to register devices' keys."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.broker.logins import coordinator_password, coordinator_password_path
from coordinator.config import CoordinatorSettings
from coordinator.federation.control_api import ControlApi
from coordinator.federation.fleet_front import FleetFrontProcess
from coordinator.federation.flower_cli import FlowerCli
from coordinator.federation.job_start import BrokerLogin
from coordinator.federation.superlink_process import SuperLinkProcess, flower_env, free_loopback_port
from coordinator.federation.warm_serverapp import warm_path, warm_serverapp
from coordinator.mid_ca import ServerTls, ensure_mid_ca, issue_server_tls
from runtime.fork_server import ForkServer

log = logging.getLogger("midgate.federation")


def mid_ca_dir(settings: CoordinatorSettings) -> Path:
    """Where the MID CA lives: beside the broker's CA certificate when that folder holds the CA key (what
    `broker-config --tls` writes), else the folder `broker-config` would create it in."""
    ca_file = settings.broker.ca_file
    if ca_file is not None and (ca_file.parent / "ca.key").exists():
        return ca_file.parent
    return settings.broker_config.output_dir / "tls"


def superlink_tls(settings: CoordinatorSettings) -> ServerTls:
    """The SuperLink's server certificate, issued by the MID CA once and reused across restarts."""
    ca = ensure_mid_ca(mid_ca_dir(settings), f"midgate CA {settings.mid}")
    tls_dir = settings.federation_dir / "tls"
    cert, key = tls_dir / "superlink.pem", tls_dir / "superlink.key"
    if cert.exists() and key.exists():
        return ServerTls(ca.cert_path, cert, key)
    tls_dir.mkdir(parents=True, exist_ok=True)
    return issue_server_tls(ca, cert, key, settings.federation.tls_hostnames)


SUPERLINK_ACCELERATION_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}
"""The SuperLink's SuperExec looks for a run to launch a ServerApp for every 0.2 s instead of Flower's 1 s: a
submitted job's ServerApp starts up to 0.8 s sooner, for five small requests a second to the SuperLink."""


def superlink_address_file(settings: CoordinatorSettings) -> Path:
    """Where `serve` writes the address of the SuperLink's own API (Control, ServerAppIo), for `job start`."""
    return settings.federation_dir / "superlink-address"


def job_broker_login(settings: CoordinatorSettings, job_id: str) -> BrokerLogin:
    """The coordinator's broker login as a job's invitations use it (`job start` and the buyer market's runner), with a
    client id of the job's own."""
    s = settings
    return BrokerLogin(
        host=s.broker.host,
        port=s.broker.port,
        username=s.broker.username,
        password=coordinator_password(coordinator_password_path(s)),
        client_id=f"{s.broker.client_id}-job-{job_id}",
        ca_file=str(s.broker.ca_file) if s.broker.tls and s.broker.ca_file else None,
        mqtt5=s.broker.mqtt5,
    )


def job_control_api(settings: CoordinatorSettings) -> ControlApi:
    """The Control API of the SuperLink `serve` runs, as `job start` calls it, trusted through the MID CA."""
    ca_cert = mid_ca_dir(settings) / "ca.crt"
    address_file = superlink_address_file(settings)
    if not ca_cert.exists() or not address_file.exists():
        raise FileNotFoundError(
            f"no MID CA at {ca_cert} or no SuperLink address at {address_file}: "
            "start `midgate coordinator serve` with [federation] enabled first"
        )
    return ControlApi(address_file.read_text().strip(), ca_cert)


@dataclass
class MidSuperLink:
    """`start()` launches the SuperLink and prepares the `flwr` connection; `stop()` ends the SuperLink's process
    group. `register_node` is serialised: concurrent `flwr supernode register` calls share one CLI home."""

    settings: CoordinatorSettings
    process: SuperLinkProcess | None = None
    front: FleetFrontProcess | None = None
    warm: ForkServer | None = None
    cli: FlowerCli | None = None
    _register_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def public_address(self) -> str:
        f = self.settings.federation
        return f"{f.public_host or f.host}:{f.port}"

    @property
    def ca_pem(self) -> str:
        if self.process is None:
            raise RuntimeError("SuperLink not started")
        return self.process.tls.ca_cert.read_text()

    def _own_ports(self) -> set[int]:
        """The ports `serve` binds after its SuperLink has started (the fleet front's, the HTTP endpoint's): free to
        the OS until then, so a free port picked for the SuperLink could be one of them (seen in CI: the SuperLink
        took the configured HTTP port and `serve` then failed to bind it)."""
        s = self.settings
        return {port for port in (s.federation.port, s.enrolment.port) if port}

    def start(self) -> None:
        s, f = self.settings, self.settings.federation
        tls = superlink_tls(s)
        home = s.federation_dir / "superlink"
        if f.fleet_front:
            host, port = "127.0.0.1", f.superlink_port or free_loopback_port(avoid=self._own_ports())
        else:
            host, port = f.host, f.port
        extra_env = dict(SUPERLINK_ACCELERATION_ENV) if f.flower_acceleration else {}
        if f.flower_acceleration and f.keep_warm_serverapp:
            extra_env["PATH"] = self._start_warm_serverapp(home, extra_env)
        self.process = SuperLinkProcess(
            flwr_home=home,
            tls=tls,
            port=port,
            host=host,
            log_path=home / "superlink.log",
            extra_env=extra_env or None,
        )
        self.process.start(timeout=f.start_timeout_s)
        if f.fleet_front:
            self.front = FleetFrontProcess.beside(
                self.process,
                f.host,
                f.port,
                s.federation_dir / "fleet-front.log",
                hold_s=f.fleet_hold_s if f.flower_acceleration else 0.0,
                stats_path=s.federation_dir / "fleet-front.json",
            )
            try:
                self.front.start(timeout=f.start_timeout_s)
            except BaseException:
                self.process.stop()
                raise
        superlink_address_file(s).write_text(self.process.address + "\n")
        self.cli = FlowerCli(s.federation_dir / "cli", self.process.address, tls.ca_cert)
        self.cli.write_config()

    def _start_warm_serverapp(self, home: Path, extra_env: dict[str, str]) -> str:
        """Launch the warm ServerApp parent (its imports run beside the SuperLink's start; a job submitted before they
        end starts `flwr-serverapp` the ordinary way) and return the SuperLink's PATH with its launcher first."""
        env = flower_env(home, extra_env)
        self.warm = warm_serverapp(self.settings.federation_dir / "warm-serverapp", env)
        self.warm.start(wait=False)
        assert self.warm.proc is not None
        log.info(
            "warm serverapp starting",
            extra={"pid": self.warm.proc.pid, "log": str(self.warm.log_path), "bin": str(self.warm.bin_dir)},
        )
        return warm_path(self.warm.directory, env["PATH"])

    def stop(self) -> None:
        superlink_address_file(self.settings).unlink(missing_ok=True)
        if self.front is not None:
            self.front.stop()
        if self.process is not None:
            self.process.stop()
        if self.warm is not None:
            self.warm.stop()  # after the SuperLink: a ServerApp still running was ended through its launcher

    def register_node(self, public_key_openssh: str) -> int:
        """Register a device's Flower EC public key (OpenSSH text); returns the SuperLink's node id."""
        if self.cli is None:
            raise RuntimeError("SuperLink not started")
        with self._register_lock:
            key_file = self.settings.federation_dir / "cli" / "register.pub"
            key_file.write_text(public_key_openssh.strip() + "\n")
            try:
                return self.cli.register_node(key_file)
            finally:
                key_file.unlink(missing_ok=True)
