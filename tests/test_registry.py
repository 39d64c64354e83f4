"""The registry on a real SQLite file: invites are single-use and expire, devices are unique, revocation sticks."""

from __future__ import annotations

import base64
import hmac
import shutil
import subprocess
from pathlib import Path

import pytest

from coordinator.broker.passwords import hash_password
from coordinator.registry.store import Registry
from protocol.errors import InviteExpiredError, InviteInvalidError, InviteUsedError, MalformedError
from protocol.identity import SignerKey

NOW = 1_790_000_000_000


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry.sqlite")


def password_matches(password: str, hashed: str) -> bool:
    """True when `password` produces `hashed` (a `$7$` entry), as Mosquitto checks a login."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        raise MalformedError("not a mosquitto $7$ password hash")
    iterations, salt_b64 = int(parts[2]), parts[3]
    return hmac.compare_digest(hash_password(password, base64.b64decode(salt_b64), iterations), hashed)


def test_invite_redeems_once(registry: Registry) -> None:
    registry.add_invite("inv1", "alice", NOW, NOW + 1000)
    key = SignerKey.generate("d-1")
    device = registry.redeem_invite("inv1", NOW + 1, "d-1", key.verifier, "h")
    assert (device.member_id, device.verifier) == ("alice", key.verifier)
    with pytest.raises(InviteUsedError):
        registry.redeem_invite("inv1", NOW + 2, "d-2", SignerKey.generate("d-2").verifier, "h")
    assert [d.device_id for d in registry.devices()] == ["d-1"]


def test_expired_and_unknown_invites_change_nothing(registry: Registry) -> None:
    registry.add_invite("inv1", "alice", NOW, NOW + 1000)
    version = registry.version()
    with pytest.raises(InviteExpiredError):
        registry.redeem_invite("inv1", NOW + 1000, "d-1", SignerKey.generate("d-1").verifier, "h")
    with pytest.raises(InviteInvalidError):
        registry.redeem_invite("nope", NOW, "d-1", SignerKey.generate("d-1").verifier, "h")
    assert registry.devices() == [] and registry.version() == version
    invite = registry.invite("inv1")
    assert invite is not None and invite.used_ms is None


def test_device_id_and_key_are_unique(registry: Registry) -> None:
    key = SignerKey.generate("d-1")
    for name in ("a", "b", "c"):
        registry.add_invite(name, "alice", NOW, NOW + 1000)
    registry.redeem_invite("a", NOW, "d-1", key.verifier, "h")
    with pytest.raises(MalformedError):
        registry.redeem_invite("b", NOW, "d-1", SignerKey.generate("d-1").verifier, "h")
    with pytest.raises(MalformedError):
        registry.redeem_invite("c", NOW, "d-9", key.verifier, "h")
    assert registry.invite("b") is not None and registry.invite("b").used_ms is None  # type: ignore[union-attr]


def test_revocation_persists_and_drops_the_broker_login(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "r.sqlite")
    registry.add_invite("a", "alice", NOW, NOW + 1000)
    registry.redeem_invite("a", NOW, "d-1", SignerKey.generate("d-1").verifier, hash_password("pw-123456789012345"))
    assert password_matches("pw-123456789012345", registry.active_password_hashes()["d-1"])
    assert registry.revoke("d-1", NOW + 5)
    assert not registry.revoke("d-1", NOW + 6)
    registry.close()
    reopened = Registry(tmp_path / "r.sqlite")
    device = reopened.device("d-1")
    assert device is not None and device.revoked_ms == NOW + 5
    assert reopened.active_password_hashes() == {}


def test_password_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    path = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(path), "alice", "s3cret-pass"], check=True, capture_output=True)
    user, hashed = path.read_text().strip().split(":", 1)
    assert user == "alice" and hashed.startswith("$7$101$")
    assert password_matches("s3cret-pass", hashed)
    assert not password_matches("s3cret-Pass", hashed)
