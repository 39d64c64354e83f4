"""The one way every role loads its configuration: a pydantic-settings model from a TOML file, env overrides on top.

Both the agent and the coordinator use this, so it lives here; it only reads the one local file it is given.
Precedence (highest first): explicit arguments, environment variables (`env_prefix` + field, `__` for nesting),
the TOML file, the model's defaults.
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Self

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

_config_file: ContextVar[Path | None] = ContextVar("midgate_config_file", default=None)


class RoleSettings(BaseSettings):
    """Base of each role's settings model; call `load(path)` rather than the constructor."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        if path is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=path))

    @classmethod
    def load(cls, path: Path | None = None, **overrides: object) -> Self:
        """Settings from `path` (TOML) with environment overrides; a missing file is an error, not defaults."""
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        token = _config_file.set(path)
        try:
            return cls(**overrides)  # type: ignore[arg-type]
        finally:
            _config_file.reset(token)


def validation_problems(error: ValidationError) -> str:
    """A pydantic error as one line, `field.path: message; ...`, without the values given: a settings file holds
    passwords, and an error message is printed and logged."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'value'}: {problem['msg']}"
        for problem in error.errors(include_url=False, include_input=False, include_context=False)
    )
