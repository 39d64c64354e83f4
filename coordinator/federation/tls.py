"""TLS for the MID's SuperLink: Flower's SuperNode authentication requires TLS, and devices trust only the MID's CA."""

from __future__ import annotations

from pathlib import Path

from coordinator.mid_ca import ServerTls, ensure_mid_ca, issue_server_tls

SuperLinkTls = ServerTls


def issue_superlink_tls(
    directory: Path, mid_name: str, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")
) -> SuperLinkTls:
    """The MID CA under `directory` (created on first use) and a new server certificate for `hosts`."""
    ca = ensure_mid_ca(directory, f"{mid_name} CA")
    return issue_server_tls(ca, directory / "superlink.pem", directory / "superlink.key", list(hosts))
