"""The Flower Deployment Engine inside midgate's roles: `midgate coordinator serve` with `[federation] enabled`
runs the MID's SuperLink (TLS from the MID CA, SuperNode authentication, no runtime dependency installation,
telemetry off, FLWR_HOME under data_dir) and stops it with itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mqtt_fixtures import MosquittoProcess, ServiceProcess, coordinator_toml, free_port, http_ready, wait_until

from coordinator.federation.superlink import FlowerCli, kill_pids
from edge.federated.supernode import generate_node_key

pytest_plugins = ["mqtt_fixtures"]

MID = "riverside"


def _superlinks(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [p for p in psutil.Process(pid).children(recursive=True) if "flower-superlink" in " ".join(p.cmdline())]
    return []


@pytest.fixture
def serve_with_superlink(tmp_path: Path, mosquitto: MosquittoProcess) -> Iterator[tuple[ServiceProcess, Path, int]]:
    data_dir = tmp_path / "coordinator"
    link_port, http_port = free_port(), free_port()
    config = tmp_path / "coordinator.toml"
    config.write_text(
        coordinator_toml(data_dir, MID, mosquitto.port, http_port)
        + f"[federation]\nenabled = true\nport = {link_port}\n"
    )
    serve = ServiceProcess("serve", ["coordinator", "serve", "--config", str(config)], tmp_path / "serve.log")
    serve.start()
    assert serve.proc is not None
    below: list[int] = []
    try:
        wait_until(lambda: http_ready(http_port) or not serve.alive, 90, "serve's HTTP endpoint")
        assert serve.alive, serve.log_text()
        below = [p.pid for p in psutil.Process(serve.proc.pid).children(recursive=True)]
        yield serve, data_dir, link_port
    except BaseException:
        print(f"---- serve log ----\n{serve.log_text()[-8000:]}")
        for log in data_dir.glob("federation/**/*.log"):
            print(f"---- {log} ----\n{log.read_text(errors='replace')[-8000:]}")
        raise
    finally:
        serve.stop()
        kill_pids(below, 5.0)  # only matters if serve died without stopping its SuperLink


@pytest.mark.slow
def test_serve_runs_the_superlink_with_mid_ca_and_auth_and_stops_it(
    serve_with_superlink: tuple[ServiceProcess, Path, int], tmp_path: Path
) -> None:
    serve, data_dir, link_port = serve_with_superlink
    assert serve.proc is not None
    links = _superlinks(serve.proc.pid)
    assert len(links) == 1
    argv = links[0].cmdline()
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-ca-certfile"):
        assert flag in argv
    env = links[0].environ()
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert Path(env["FLWR_HOME"]).is_relative_to(data_dir)
    # The SuperLink's certificate chains to the MID CA that `broker-config --tls` uses and devices receive.
    ca_cert = data_dir / "broker" / "tls" / "ca.crt"
    assert argv[argv.index("--ssl-ca-certfile") + 1] == str(ca_cert)

    # A client that trusts only the MID CA reaches it over TLS and can register a SuperNode key (auth is on).
    cli = FlowerCli(tmp_path / "flwr-cli", f"127.0.0.1:{link_port}", ca_cert)
    cli.write_config()
    first = cli.register_node(generate_node_key(tmp_path / "k1").public_key)
    second = cli.register_node(generate_node_key(tmp_path / "k2").public_key)
    assert first != second and first > 0 and second > 0

    link_pids = [p.pid for p in links] + [c.pid for p in links for c in p.children(recursive=True)]
    serve.stop()
    assert serve.proc.returncode == 0, serve.log_text()
    assert not [pid for pid in link_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
