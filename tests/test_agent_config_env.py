"""agent.toml with `MIDGATE_AGENT_*` overrides: the environment still wins over the file, nested with `__`, whether
pydantic-settings is imported for it or (no variable naming a field) the file is validated directly
(protocol.settings)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edge.agent.config import AgentSettings


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\nheartbeat_s = 30\n{text}')
    return path


def test_the_file_alone_is_read_and_a_role_variable_is_no_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIDGATE_AGENT_CONFIG", str(tmp_path / "elsewhere.toml"))
    settings = AgentSettings.load(_config(tmp_path, "[sample_store]\nmax_age_days = 7\n"))
    assert (settings.heartbeat_s, settings.sample_store.max_age_days) == (30.0, 7.0)
    assert settings.sample_store.path == tmp_path / "data" / "samples.db"


def test_environment_overrides_the_file_nested_and_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDGATE_AGENT_HEARTBEAT_S", "7")
    monkeypatch.setenv("midgate_agent_sample_store__max_samples", "1000")
    settings = AgentSettings.load(_config(tmp_path, "[sample_store]\nmax_age_days = 7\n"))
    assert isinstance(settings, AgentSettings)
    assert settings.heartbeat_s == 7.0
    assert (settings.sample_store.max_age_days, settings.sample_store.max_samples) == (7.0, 1000)


def test_an_override_is_validated_as_the_file_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIDGATE_AGENT_KEEPALIVE_S", "1")
    with pytest.raises(ValidationError, match="keepalive_s"):
        AgentSettings.load(_config(tmp_path, ""))


def test_a_key_in_another_case_names_its_field_and_an_unknown_key_is_refused(tmp_path: Path) -> None:
    assert AgentSettings.load(_config(tmp_path, "KEEPALIVE_S = 90\n")).keepalive_s == 90
    with pytest.raises(ValidationError, match="no_such_key"):
        AgentSettings.load(_config(tmp_path, "no_such_key = 1\n"))
