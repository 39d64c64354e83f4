"""`midgate coordinator relay ...`: logins for members' hubs, whose Mosquitto bridges the member's other devices at
home to the MID's broker (deploy/raspberrypi/README.md, "The bridge to your MID"). A relay carries only the messages
of its member's devices, by the broker's ACL; every report it carries is still signed by its device and checked by
the coordinator, so a relay can delay or drop its member's messages but never forge one. Imports live inside the
commands: every `midgate` invocation imports the CLI modules."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from collections.abc import Callable

    from coordinator.config import CoordinatorSettings
    from coordinator.registry.store import Registry

app = typer.Typer(no_args_is_help=True, help="Members' hubs: relay logins that carry their devices to the broker.")

ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")
PasswordFileOption = typer.Option(None, help="write the password here (0600, a new file) rather than printing it")


def _settings(config: Path | None) -> CoordinatorSettings:
    from coordinator.config import CoordinatorSettings

    return CoordinatorSettings.load_for_command(config)


@app.command("add")
def add(
    name: str = typer.Argument(..., help="the hub's name ([a-z0-9-]); its login is relay.NAME"),
    member: str = typer.Option(..., help="the member whose devices the hub carries"),
    password_file: Path | None = PasswordFileOption,
    config: Path | None = ConfigOption,
) -> None:
    """Make a hub's relay login for MEMBER's devices and tell the broker; prints what the member's hub installer needs
    (`install.sh --hub --bridge ... --bridge-login relay.NAME`). The password is shown once."""
    from coordinator.broker.config import device_ca_file, relay_username
    from coordinator.broker.logins import sync_broker_logins
    from coordinator.broker.owners import BrokerFilesError
    from coordinator.broker.passwords import hash_password, new_password
    from coordinator.registry.store import Registry, RelayError
    from protocol.errors import BadTopicError
    from protocol.topics import check_id

    settings = _settings(config)
    try:
        username = relay_username(name)
        check_id(member, "member")
    except BadTopicError as error:
        typer.echo(f"relay add: {error}", err=True)
        raise typer.Exit(2) from None
    if password_file is not None and password_file.exists():
        typer.echo(f"relay add: {password_file} exists; name a new file", err=True)
        raise typer.Exit(2)
    password = new_password()
    registry = Registry(settings.registry_path)
    try:
        registry.add_relay(name, member, hash_password(password), time.time_ns() // 1_000_000)
        carried = registry.relay_devices()[name]
        written = sync_broker_logins(registry, settings)
    except RelayError as error:
        typer.echo(f"relay add: {error}", err=True)
        raise typer.Exit(1) from None
    except BrokerFilesError as error:
        typer.echo(f"relay {name} added, but the broker does not know it until its logins are rewritten: {error}")
        raise typer.Exit(1) from None
    finally:
        registry.close()
    if password_file is not None:
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, f"{password}\n".encode())
        finally:
            os.close(fd)
        typer.echo(f"login {username}, password in {password_file}")
    else:
        typer.echo(f"login {username}, password {password} (shown once)")
    host = settings.broker.public_host or settings.broker_config.tls_hostnames[0]
    port = settings.broker.public_port or settings.broker_config.tls_port
    typer.echo(f"carries {len(carried)} device(s) of {member} now, and each one enrolled later")
    typer.echo(f"bridge to {host}:{port} trusting {device_ca_file(settings)}")
    if not written:
        typer.echo("no broker password file yet: `midgate coordinator broker-config` writes it with this login")


@app.command("list")
def list_relays(config: Path | None = ConfigOption) -> None:
    """Every relay, one a line (tab-separated): name, login, member, active or revoked, devices carried."""
    from coordinator.broker.config import relay_username
    from coordinator.registry.store import Registry

    registry = Registry(_settings(config).registry_path)
    try:
        relays, carried = registry.relays(), registry.relay_devices()
    finally:
        registry.close()
    if not relays:
        typer.echo("no relays (`midgate coordinator relay add NAME --member MEMBER` makes one)")
        return
    typer.echo("\t".join(("relay", "login", "member", "status", "devices")))
    for r in relays:
        status = "revoked" if r.revoked else "active"
        devices = ",".join(carried.get(r.name, [])) or "-"
        typer.echo("\t".join((r.name, relay_username(r.name), r.member_id, status, devices)))


@app.command("revoke")
def revoke(name: str = typer.Argument(...), config: Path | None = ConfigOption) -> None:
    """Remove a hub's relay login from the broker (its devices can still connect on their own)."""
    revoke_login(_settings(config), lambda registry, now_ms: registry.revoke_relay(name, now_ms), f"relay {name}")


def revoke_login(settings: CoordinatorSettings, revoke: Callable[[Registry, int], bool], what: str) -> None:
    """Revoke `what` in the registry with `revoke(registry, now_ms)` (False: nothing active by that name, exit 1),
    then rewrite the broker's logins and ACL and reload it; a broker file it cannot rewrite is said, exit 1. For a
    device (`midgate coordinator revoke`) and a hub's relay alike."""
    from coordinator.broker.logins import sync_broker_logins
    from coordinator.broker.owners import BrokerFilesError
    from coordinator.registry.store import Registry

    registry = Registry(settings.registry_path)
    try:
        if not revoke(registry, time.time_ns() // 1_000_000):
            typer.echo(f"no active {what}", err=True)
            raise typer.Exit(1)
        sync_broker_logins(registry, settings)
    except BrokerFilesError as error:
        typer.echo(f"revoked {what}, but its broker login stays until the logins are rewritten: {error}", err=True)
        raise typer.Exit(1) from None
    finally:
        registry.close()
    typer.echo(f"revoked {what}")
