"""Keeping the broker's password file in step with the registry, and telling Mosquitto to reread it.

Besides the devices (username = device id), the broker knows the MID's own services: the coordinator (`serve`) and
each screening worker listed in `ingest.worker_ids`, whose username is `ingest.{worker id}`. A device id never
contains a dot, so no device can be given a worker's username, and a worker's ACL (coordinator/broker/config.py)
is far narrower than the coordinator's: a stolen worker password cannot write commit notices or another worker's
hand-offs. A member's hub relays its member's other devices as `relay.{name}` (`midgate coordinator relay add`); its
ACL lists those devices, so it is rewritten with the password file whenever a device of a member with a hub comes or
goes.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from coordinator.broker.config import broker_files, relay_username, render_acl, render_password_file
from coordinator.broker.owners import rewrite_file
from coordinator.broker.passwords import hash_password, new_password
from coordinator.config import CoordinatorSettings
from coordinator.registry.store import Registry
from protocol.topics import check_id

log = logging.getLogger("midgate.broker")


def coordinator_password(path: Path) -> str:
    """A service's own broker password, created (0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    password = new_password()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, password.encode())
    finally:
        os.close(fd)
    return password


def coordinator_password_path(settings: CoordinatorSettings) -> Path:
    return settings.broker.password_file or settings.data_dir / "broker-coordinator.password"


def worker_username(worker_id: str) -> str:
    return f"ingest.{check_id(worker_id, 'worker')}"


def worker_password_path(settings: CoordinatorSettings, worker_id: str) -> Path:
    """0600, created by `broker-config` or the worker's first start; copy it with the hand-off key to a worker host."""
    return settings.data_dir / f"broker-worker-{check_id(worker_id, 'worker')}.password"


def service_password_hashes(settings: CoordinatorSettings) -> dict[str, str]:
    """Hashed logins of the coordinator and of every configured screening worker (passwords created if missing)."""
    hashes = {settings.broker.username: hash_password(coordinator_password(coordinator_password_path(settings)))}
    for worker_id in settings.ingest.worker_ids:
        hashes[worker_username(worker_id)] = hash_password(
            coordinator_password(worker_password_path(settings, worker_id))
        )
    return hashes


def broker_password_hashes(registry: Registry, settings: CoordinatorSettings) -> dict[str, str]:
    """Every login the broker knows: active devices, active hubs' relays, the coordinator and screening workers."""
    hashes = registry.active_password_hashes()
    hashes.update({relay_username(r.name): r.password_hash for r in registry.relays() if not r.revoked})
    hashes.update(service_password_hashes(settings))
    return hashes


def broker_acl(registry: Registry, settings: CoordinatorSettings) -> str:
    return render_acl(settings.mid, settings.broker.username, settings.ingest.worker_ids, registry.relay_devices())


def sync_broker_logins(registry: Registry, settings: CoordinatorSettings) -> int:
    """Rewrite the password file and the ACL `broker-config` wrote from the registry (revoked devices and relays
    lose their login; a hub's relay carries its member's devices as they are now) plus the service logins, keeping
    the owner and mode the broker reads them with, and SIGHUP the broker, which rereads both. Returns the number of
    logins written; 0, touching nothing, when there is no password file to keep in step."""
    files = broker_files(settings)
    if not files.passwords.exists():
        return 0
    hashes = broker_password_hashes(registry, settings)
    if files.acl.exists():
        rewrite_file(files.acl, broker_acl(registry, settings).encode())
    rewrite_file(files.passwords, render_password_file(hashes).encode())
    reload_broker(files.pid_file)
    return len(hashes)


def reload_broker(pid_file: Path) -> bool:
    """SIGHUP the Mosquitto whose pid `pid_file` holds, so it rereads its logins. False, logged with the reason, when
    there is none: until the broker reloads, new devices are refused and revoked ones still let in."""
    reason = ""
    try:
        pid = int(pid_file.read_text().strip())
    except FileNotFoundError:
        reason = "no pid file (broker not running, or `[broker] pid_file` names another file)"
    except OSError as error:
        reason = f"cannot read the pid file: {error.strerror}"
    except ValueError:
        reason = "the pid file holds no pid"
    else:
        if not _runs_mosquitto(pid):
            reason = f"pid {pid} is not a running mosquitto (stale pid file)"
        else:
            try:
                os.kill(pid, signal.SIGHUP)
                return True
            except ProcessLookupError:
                reason = f"pid {pid} has exited"
            except PermissionError:
                reason = f"not permitted to signal pid {pid}: run `serve` as root or as the broker's user"
    log.error("broker not reloaded: its logins are stale", extra={"pid_file": str(pid_file), "reason": reason})
    return False


def _runs_mosquitto(pid: int) -> bool:
    """A stale pid file may name an unrelated process now, which SIGHUP would end; Linux tells us what runs there."""
    comm = Path(f"/proc/{pid}/comm")
    try:
        return comm.read_text().strip() == "mosquitto"
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs (not Linux): trust the pid file
