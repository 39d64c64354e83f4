"""A complete Mosquitto configuration for one MID: listeners, TLS, password file, ACLs, queue sizing, persistence.

The ACL is the broker's half of topic ownership (the coordinator checks the signer against the topic as well;
broker auth never replaces signature checks): a device, whose broker username is its device id, may write only
`mid/{mid}/dev/{its id}/up/#` and read only its own `down/#`, the MID's broadcasts and the retained checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker.tls import BrokerTlsFiles
from coordinator.config import BrokerConfigSettings
from protocol.topics import check_id


@dataclass(frozen=True)
class BrokerFiles:
    config: Path
    passwords: Path
    acl: Path
    persistence_dir: Path
    log: Path


def render_acl(mid: str, coordinator_user: str, worker_ids: Sequence[str] = ()) -> str:
    """The ACL file: the coordinator reads every device's `up` and writes `down`, checkpoints and broadcasts; each
    screening worker reads the device `up` topics (through its shared subscription), writes only its own hand-off
    topic and reads only its own commit notices."""
    base = f"mid/{mid}"
    workers: list[str] = []
    for worker_id in worker_ids:
        workers += [
            f"user ingest.{check_id(worker_id, 'worker')}",
            f"topic read {base}/dev/+/up/#",
            f"topic write {base}/ingest/verified/{worker_id}",
            f"topic read {base}/ingest/committed/{worker_id}",
            "",
        ]
    return "\n".join(
        [
            "# Written by `midgate coordinator broker-config`; regenerate rather than edit.",
            f"user {coordinator_user}",
            f"topic read {base}/dev/+/up/#",
            f"topic write {base}/dev/+/down/#",
            f"topic readwrite {base}/ledger/checkpoint",
            f"topic write {base}/broadcast/#",
            "# The sequencer reads every worker's hand-offs and writes their commit notices; no device can slip an",
            "# envelope past verification (each hand-off also carries an HMAC tag).",
            f"topic readwrite {base}/ingest/#",
            "",
            "# Screening workers (ingest.worker_ids), one login each: `user` blocks end at the next `user` line.",
            *workers,
            "# Every device: its broker username is its device id (%u); mosquitto refuses %u values with / + #.",
            f"pattern write {base}/dev/%u/up/#",
            f"pattern read {base}/dev/%u/down/#",
            f"pattern read {base}/broadcast/#",
            f"pattern read {base}/ledger/checkpoint",
            "",
        ]
    )


def render_password_file(hashes: Mapping[str, str]) -> str:
    """`user:$7$...` lines; usernames must not contain ':' or newlines (device ids never do)."""
    for user in hashes:
        if ":" in user or "\n" in user or not user:
            raise ValueError(f"invalid broker username {user!r}")
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(hashes.items()))


def render_mosquitto_conf(
    settings: BrokerConfigSettings, files: BrokerFiles, tls: BrokerTlsFiles | None, tls_port: int | None = None
) -> str:
    """mosquitto.conf for Mosquitto 2.x."""
    lines = [
        "# Written by `midgate coordinator broker-config`.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files.passwords}",
        f"acl_file {files.acl}",
        "persistence true",
        f"persistence_location {files.persistence_dir}/",
        f"autosave_interval {settings.autosave_interval_s}",
        # Offline devices keep a session; their receipts wait here until they reconnect.
        f"persistent_client_expiration {settings.persistent_client_expiration}",
        f"max_queued_messages {settings.max_queued_messages}",
        "max_queued_bytes 0",
        f"max_packet_size {settings.max_packet_size}",
        "max_inflight_messages 0",
        "retain_available true",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"log_dest file {files.log}",
        "",
    ]
    if tls is not None:
        lines += [
            f"listener {tls_port or settings.tls_port} {settings.listen_host}",
            f"cafile {tls.ca_cert}",
            f"certfile {tls.server_cert}",
            f"keyfile {tls.server_key}",
            "tls_version tlsv1.2",
            "",
        ]
    if settings.local_port is not None:
        lines += [f"listener {settings.local_port} 127.0.0.1", ""]
    return "\n".join(lines)


def write_broker_files(
    directory: Path,
    settings: BrokerConfigSettings,
    mid: str,
    coordinator_user: str,
    password_hashes: Mapping[str, str],
    tls: BrokerTlsFiles | None,
    worker_ids: Sequence[str] = (),
) -> BrokerFiles:
    """Write mosquitto.conf, the ACL and the password file into `directory` (password file 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = BrokerFiles(
        config=directory / "mosquitto.conf",
        passwords=directory / "passwords",
        acl=directory / "acl",
        persistence_dir=directory / "data",
        log=directory / "mosquitto.log",
    )
    files.persistence_dir.mkdir(exist_ok=True)
    files.acl.write_text(render_acl(mid, coordinator_user, worker_ids))
    write_password_file(files.passwords, password_hashes)
    files.config.write_text(render_mosquitto_conf(settings, files, tls))
    return files


def write_password_file(path: Path, password_hashes: Mapping[str, str]) -> None:
    """Replace the password file atomically so a broker reload never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, render_password_file(password_hashes).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
