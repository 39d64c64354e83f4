"""The royalty policy in coordinator.toml: the 30 % fee cap is refused at load, through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from coordinator.config import CoordinatorSettings
from protocol.errors import PolicyViolationError, Reason

_CLI = [sys.executable, "-c", "from midgate_cli import app; app()", "coordinator"]


def _config(tmp_path: Path, royalties: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(f'mid = "riverside"\ndata_dir = "{tmp_path / "data"}"\n[royalties]\n{royalties}\n')
    return path


def test_config_policy_becomes_the_royalty_policy(tmp_path: Path) -> None:
    path = _config(tmp_path, "version = 3\nfee_bps = 3000\nbase_price_minor = 500\nmin_price_minor = 50")
    policy = CoordinatorSettings.load(path).royalties.policy()
    assert (policy.version, policy.fee_bps, policy.knob.base_price_minor, policy.knob.min_price_minor) == (
        3,
        3000,
        500,
        50,
    )


@pytest.mark.parametrize("royalties", ["fee_bps = 3001", "base_price_minor = 50\nmin_price_minor = 100"])
def test_policy_breaking_config_is_refused_at_load(tmp_path: Path, royalties: str) -> None:
    with pytest.raises(PolicyViolationError) as info:
        CoordinatorSettings.load(_config(tmp_path, royalties))
    assert info.value.reason is Reason.POLICY_VIOLATION


def test_env_override_cannot_raise_the_fee_above_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDGATE_COORDINATOR_ROYALTIES__FEE_BPS", "4500")
    with pytest.raises(PolicyViolationError):
        CoordinatorSettings.load(_config(tmp_path, "fee_bps = 1000"))


@pytest.mark.parametrize("command", [["serve"], ["devices"], ["invite", "alice"]])
def test_cli_refuses_a_fee_above_the_cap(tmp_path: Path, command: list[str]) -> None:
    path = _config(tmp_path, "fee_bps = 3500")
    result = subprocess.run([*_CLI, *command, "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "policy_violation" in result.stderr and "30 %" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_cli_accepts_the_cap_itself(tmp_path: Path) -> None:
    path = _config(tmp_path, "fee_bps = 3000")
    result = subprocess.run([*_CLI, "devices", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert "policy_violation" not in result.stderr
    assert result.returncode == 0, result.stderr
