"""The broker's TLS files: the MID's CA (coordinator.mid_ca) and a server certificate for the broker's hostnames."""

from __future__ import annotations

from pathlib import Path

from coordinator.mid_ca import ServerTls, ensure_mid_ca, issue_server_tls

BrokerTlsFiles = ServerTls


def ensure_broker_tls(directory: Path, mid: str, hostnames: list[str]) -> BrokerTlsFiles:
    """Create the MID CA and a server certificate for `hostnames` in `directory` unless they already exist."""
    cert, key = directory / "server.crt", directory / "server.key"
    ca = ensure_mid_ca(directory, f"midgate CA {mid}")
    if cert.exists() and key.exists():
        return BrokerTlsFiles(ca.cert_path, cert, key)
    return issue_server_tls(ca, cert, key, hostnames)
