"""`serve` picks the SuperLink's loopback port from the OS before it binds its own HTTP endpoint and fleet front:
the pick must never be one of those configured ports (CI saw the SuperLink take the HTTP port, and `serve` exit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import CoordinatorSettings
from coordinator.federation.mid_superlink import MidSuperLink
from coordinator.federation.superlink_process import free_loopback_port


def test_a_free_port_is_never_one_the_caller_will_bind() -> None:
    taken = free_loopback_port()
    assert free_loopback_port(avoid={taken}) != taken
    with pytest.raises(OSError, match="no free loopback port"):
        free_loopback_port(avoid=range(1, 65536))


def test_the_superlink_avoids_serve_s_http_and_fleet_ports(tmp_path: Path) -> None:
    settings = CoordinatorSettings.model_validate(
        {"data_dir": tmp_path, "enrolment": {"port": 48123}, "federation": {"port": 48124}}
    )
    assert MidSuperLink(settings)._own_ports() == {48123, 48124}
    picked_free = CoordinatorSettings.model_validate({"data_dir": tmp_path, "enrolment": {"port": 0}})
    assert 0 not in MidSuperLink(picked_free)._own_ports()
