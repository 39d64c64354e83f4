"""Keeping the broker's password file in step with the registry, and telling Mosquitto to reread it."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from coordinator.broker.config import write_password_file
from coordinator.broker.passwords import hash_password, new_password
from coordinator.registry.store import Registry

log = logging.getLogger("midgate.broker")


def coordinator_password(path: Path) -> str:
    """The coordinator's own broker password, created (0600) on first use."""
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


def sync_broker_logins(
    registry: Registry,
    passwords_file: Path,
    coordinator_user: str,
    coordinator_password_file: Path,
    pid_file: Path | None,
) -> int:
    """Rewrite the password file from the registry (revoked devices lose their login) and SIGHUP the broker.

    Returns the number of logins written.
    """
    hashes = registry.active_password_hashes()
    hashes[coordinator_user] = hash_password(coordinator_password(coordinator_password_file))
    write_password_file(passwords_file, hashes)
    if pid_file is not None and pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
        except (ValueError, ProcessLookupError) as exc:
            log.warning("could not signal the broker to reload", extra={"pid_file": str(pid_file), "error": str(exc)})
    return len(hashes)
