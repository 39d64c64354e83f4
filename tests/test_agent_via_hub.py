"""`[[via_hub]]` in agent.toml: a membership whose broker the device reaches through a Pi hub at home. The route the
session connects by (edge.agent.session.broker_route), and the precise refusals of a table or password file it
cannot use; `agent run` itself through a hub: tests/test_hub_relay_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edge.agent.config import AgentSettings, HubRoute
from edge.agent.membership import Membership, MembershipRecord
from edge.agent.session import broker_route
from protocol.enrolment import BrokerCredentials
from protocol.identity import SignerKey

PASSWORD = "k3Jx-9_ab12cd34ef56gh78"


def _settings(tmp_path: Path, tables: str) -> AgentSettings:
    path = tmp_path / "agent.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n{tables}')
    return AgentSettings.load(path)


def _membership(tmp_path: Path) -> Membership:
    key = SignerKey.generate("d-1")
    broker = BrokerCredentials(
        host="mqtt.riverside.example", port=8883, tls=True, ca_pem="-", username="d-1", password="p" * 24
    )
    record = MembershipRecord(
        mid="riverside",
        device="d-1",
        member="ann",
        mid_key=key.verifier.text(),
        enrolment_url="https://riverside.example",
        broker=broker,
        enrolled_ms=1,
    )
    return Membership(tmp_path, record, key)


def test_a_membership_named_in_via_hub_connects_to_the_hub_as_its_device(tmp_path: Path) -> None:
    (tmp_path / "hub.secret").write_text(f"{PASSWORD}\n")
    settings = _settings(
        tmp_path,
        f'[[via_hub]]\nmid = "riverside"\nhost = "192.168.1.20"\npassword_file = "{tmp_path / "hub.secret"}"\n'
        f'[[via_hub]]\nmid = "hillside"\nhost = "192.168.1.21"\nport = 1884\npassword_file = "/nonexistent"\n',
    )
    membership = _membership(tmp_path)
    route = broker_route(membership, settings.hub_route("riverside"))
    assert (route.host, route.port, route.username, route.password) == ("192.168.1.20", 1883, "d-1", PASSWORD)
    assert route.ca_file is None and str(route) == "192.168.1.20:1883 (through a hub)"
    direct = broker_route(membership, settings.hub_route("lakeside"))
    assert (direct.host, direct.port, direct.password) == ("mqtt.riverside.example", 8883, "p" * 24)
    assert direct.ca_file == tmp_path / "ca.pem" and str(direct) == "mqtt.riverside.example:8883 (TLS)"


@pytest.mark.parametrize(
    ("content", "reason"),
    [(None, "cannot read"), ("short\n", "no password of 16-128"), ("", "no password"), ("x" * 5000, "no password")],
)
def test_a_password_file_it_cannot_use_is_refused_with_the_reason(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    secret = tmp_path / "hub.secret"
    if content is not None:
        secret.write_text(content)
    route = HubRoute(mid="riverside", host="192.168.1.20", password_file=secret)
    with pytest.raises(ValueError, match=reason):
        broker_route(_membership(tmp_path), route)


@pytest.mark.parametrize(
    "tables",
    [
        '[[via_hub]]\nmid = "riverside"\nhost = "a"\npassword_file = "f"\n[[via_hub]]\nmid = "riverside"\nhost = "b"\n'
        'password_file = "f"\n',
        '[[via_hub]]\nmid = "River"\nhost = "a"\npassword_file = "f"\n',
        '[[via_hub]]\nmid = "riverside"\nhost = "a"\npassword_file = "f"\nport = 0\n',
        '[[via_hub]]\nmid = "riverside"\nhost = "a"\n',
        '[[via_hub]]\nmid = "riverside"\nhost = "a"\npassword_file = "f"\ntls = true\n',
    ],
)
def test_a_via_hub_table_it_cannot_use_is_refused(tmp_path: Path, tables: str) -> None:
    with pytest.raises(ValidationError):
        _settings(tmp_path, tables)
