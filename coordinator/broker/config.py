"""A complete Mosquitto configuration for one MID: listeners, TLS, password file, ACLs, queue sizing, persistence,
log and pid file, each owned the way the broker needs (coordinator/broker/owners.py), and a systemd drop-in that runs
Debian's packaged `mosquitto.service` with it.

The ACL is the broker's half of topic ownership (the coordinator checks the signer against the topic as well;
broker auth never replaces signature checks): a device, whose broker username is its device id, may write only
`mid/{mid}/dev/{its id}/up/#` and read only its own `down/#`, the MID's broadcasts and the retained checkpoint. A
member's hub, whose Mosquitto bridges the member's other devices at home to this broker, logs in as `relay.{name}`
and may carry the `up` and `down` topics of that member's devices only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coordinator.broker.owners import BrokerAccount, replace_file, set_owner
from coordinator.broker.tls import BrokerTlsFiles
from coordinator.config import BrokerConfigSettings, CoordinatorSettings
from protocol.topics import check_id

# Debian's mosquitto.service starts this binary; the drop-in only changes which configuration it reads.
MOSQUITTO_BINARY = "/usr/sbin/mosquitto"


@dataclass(frozen=True)
class BrokerFiles:
    """Where everything `broker-config` writes lives, under one folder (the pid file may be elsewhere)."""

    directory: Path
    pid_file: Path

    @property
    def config(self) -> Path:
        return self.directory / "mosquitto.conf"

    @property
    def passwords(self) -> Path:
        return self.directory / "passwords"

    @property
    def acl(self) -> Path:
        return self.directory / "acl"

    @property
    def tls_dir(self) -> Path:
        """The MID CA (ca.crt, and ca.key, which the broker never reads) and the broker's server certificate."""
        return self.directory / "tls"

    @property
    def persistence_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_dir(self) -> Path:
        return self.directory / "log"

    @property
    def log(self) -> Path:
        return self.log_dir / "mosquitto.log"

    @property
    def systemd_dropin(self) -> Path:
        """Install as /etc/systemd/system/mosquitto.service.d/midgate.conf."""
        return self.directory / "systemd" / "mosquitto.service.d" / "midgate.conf"


def broker_files(settings: CoordinatorSettings, directory: Path | None = None) -> BrokerFiles:
    """The broker's files for these settings: in `directory` if given (`broker-config --output-dir`), else in
    `[broker_config] output_dir`, where `serve` and `revoke` rewrite the logins."""
    directory = directory or settings.broker_config.output_dir
    return BrokerFiles(directory, settings.broker.pid_file or directory / "run" / "mosquitto.pid")


def device_ca_file(settings: CoordinatorSettings) -> Path:
    """The CA devices trust for the broker: `[broker] ca_file`, else the MID CA that `broker-config` writes."""
    return settings.broker.ca_file or broker_files(settings).tls_dir / "ca.crt"


def relay_username(name: str) -> str:
    """A hub's relay login: `relay.` + its name. A device id never contains a dot, so no device is given it."""
    return f"relay.{check_id(name, 'relay')}"


def render_acl(
    mid: str,
    coordinator_user: str,
    worker_ids: Sequence[str] = (),
    relays: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """The ACL file: the coordinator reads every device's `up` and writes `down`, checkpoints and broadcasts; each
    screening worker reads the device `up` topics (through its shared subscription), writes only its own hand-off
    topic and reads only its own commit notices; each hub's relay login (`relays`: relay name -> the devices of its
    member) writes the `up` and reads the `down` topics of those devices only, and reads what every device reads."""
    base = f"mid/{mid}"
    carried: list[str] = []
    for name, devices in sorted((relays or {}).items()):
        carried += [f"user {relay_username(name)}"]
        for device in devices:
            check_id(device, "device")
            carried += [f"topic write {base}/dev/{device}/up/#", f"topic read {base}/dev/{device}/down/#"]
        carried += [f"topic read {base}/broadcast/#", f"topic read {base}/ledger/checkpoint", ""]
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
            "# Hubs' relay logins (`midgate coordinator relay add`): each carries its member's devices only.",
            *carried,
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
        # Started as root, Mosquitto drops to this user before it opens any file below (and rereads them all as it).
        f"user {settings.user}",
        f"pid_file {files.pid_file}",
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


def render_systemd_dropin(files: BrokerFiles) -> str:
    """A drop-in for Debian's mosquitto.service (Type=notify, ExecReload=kill -HUP $MAINPID): the same unit, run with
    the MID's mosquitto.conf instead of /etc/mosquitto/mosquitto.conf."""
    return "\n".join(
        [
            "# Written by `midgate coordinator broker-config`. Install as",
            "# /etc/systemd/system/mosquitto.service.d/midgate.conf, then:",
            "#   systemctl daemon-reload && systemctl restart mosquitto",
            "# Mosquitto starts as root and drops to the `user` named in its configuration.",
            "[Service]",
            "ExecStart=",
            f"ExecStart={MOSQUITTO_BINARY} -c {files.config}",
            "",
        ]
    )


def write_broker_files(
    files: BrokerFiles,
    settings: BrokerConfigSettings,
    mid: str,
    coordinator_user: str,
    password_hashes: Mapping[str, str],
    tls: BrokerTlsFiles | None,
    account: BrokerAccount | None,
    worker_ids: Sequence[str] = (),
    relays: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Write mosquitto.conf, the ACL, the password file and the systemd drop-in, and give every file and folder the
    broker uses its owner and mode (`account` None: all stay with the user running this, as Mosquitto will too)."""
    broker = (account.uid, account.gid) if account else None
    # What the broker only reads or enters belongs to the writer, in the broker's group.
    readable = (os.geteuid(), account.gid) if account else None
    files.directory.mkdir(parents=True, exist_ok=True)
    set_owner(files.directory, 0o750, readable)
    for folder, mode in ((files.persistence_dir, 0o700), (files.log_dir, 0o750)):
        folder.mkdir(exist_ok=True)
        set_owner(folder, mode, broker)
        for inside in folder.iterdir():  # e.g. a mosquitto.db saved while the broker still ran as another user
            set_owner(inside, 0o600, broker)
    if files.pid_file.parent == files.directory / "run":
        files.pid_file.parent.mkdir(exist_ok=True)
        # The coordinator reads the pid it signals; a pid is no secret.
        set_owner(files.pid_file.parent, 0o755, broker)
    replace_file(files.acl, render_acl(mid, coordinator_user, worker_ids, relays).encode(), 0o600, broker)
    replace_file(files.passwords, render_password_file(password_hashes).encode(), 0o600, broker)
    replace_file(files.config, render_mosquitto_conf(settings, files, tls).encode(), 0o640, readable)
    if tls is not None:
        set_owner(tls.server_cert.parent, 0o750, readable)
        set_owner(tls.server_key, 0o600, broker)
        for public in (tls.ca_cert, tls.server_cert):
            set_owner(public, 0o644, None)
    files.systemd_dropin.parent.mkdir(parents=True, exist_ok=True)
    replace_file(files.systemd_dropin, render_systemd_dropin(files).encode(), 0o644, None)
