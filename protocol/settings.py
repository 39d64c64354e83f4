"""The one way every role loads its configuration: a settings model from a TOML file, env overrides on top.

Both the agent and the coordinator use this, so it lives here; it only reads the one local file it is given.
Precedence (highest first): explicit arguments, environment variables (`ENV_PREFIX` + field, `__` for nesting),
the TOML file, the model's defaults.

pydantic-settings does the loading, imported only when it has something to do: an environment variable naming a
field, or a top-level key that names a field in another case (pydantic-settings matches those case-insensitively).
Otherwise its sources give exactly the file's table with the arguments on top, which is validated here directly:
the idle agent then does not keep pydantic-settings (with dotenv, its CLI and cloud sources) resident: 1.7 MB of
its 50 MB budget (BENCHMARKS.md, "Idle agent").
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self, cast

from pydantic import BaseModel, ConfigDict, ValidationError

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

ENV_NESTED_DELIMITER = "__"

_config_file: ContextVar[Path | None] = ContextVar("midgate_config_file", default=None)


class RoleSettings(BaseModel):
    """Base of each role's settings model; call `load(path)` rather than the constructor, which reads neither a
    file nor the environment."""

    # pydantic-settings' BaseSettings defaults, so a model validates the same with or without it.
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_default=True)
    ENV_PREFIX: ClassVar[str] = ""

    @classmethod
    def load(cls, path: Path | None = None, **overrides: object) -> Self:
        """Settings from `path` (TOML) with environment overrides; a missing file is an error, not defaults."""
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        from_file = _read_toml(path) if path is not None else {}
        if cls._names_a_field_in_the_environment(os.environ) or cls._renames_a_field(from_file, overrides):
            return cls._loaded_by_pydantic_settings(path, overrides)
        return cls(**_deep_update(from_file, overrides))

    @classmethod
    def _names_a_field_in_the_environment(cls, environ: Mapping[str, str]) -> bool:
        """Whether an environment variable is one pydantic-settings would read (it matches names case-insensitively):
        a role's other variables (MIDGATE_AGENT_CONFIG, the path of its file) are not overrides."""
        names = {f"{cls.ENV_PREFIX}{field}".lower() for field in cls.model_fields}
        for variable in environ:
            lowered = variable.lower()
            if lowered in names or lowered.split(ENV_NESTED_DELIMITER)[0] in names:
                return True
        return False

    @classmethod
    def _renames_a_field(cls, *tables: Mapping[str, object]) -> bool:
        """Whether a top-level key names a field in another case, which pydantic-settings takes as that field."""
        lowered_fields = {field.lower() for field in cls.model_fields}
        return any(key not in cls.model_fields and key.lower() in lowered_fields for table in tables for key in table)

    @classmethod
    def _loaded_by_pydantic_settings(cls, path: Path | None, overrides: Mapping[str, object]) -> Self:
        token = _config_file.set(path)
        try:
            return cast(Self, _with_pydantic_settings(cls)(**overrides))  # type: ignore[arg-type]
        finally:
            _config_file.reset(token)


def _read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        return tomllib.load(file)


def _deep_update(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `update` on top, tables merged key by key (as pydantic-settings merges its sources)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_update(merged[key], value)
        else:
            merged[key] = value
    return merged


@functools.cache
def _with_pydantic_settings(role: type[RoleSettings]) -> type[BaseSettings]:
    """`role` as a pydantic-settings model: the role's fields and validators, its file and environment read by
    pydantic-settings' own sources (arguments, then `ENV_PREFIX` variables, then the TOML file)."""
    from pydantic_settings import BaseSettings, SettingsConfigDict, TomlConfigSettingsSource

    def settings_customise_sources(
        cls: type[BaseSettings],
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

    namespace = {
        "__module__": role.__module__,
        "__doc__": role.__doc__,
        "model_config": SettingsConfigDict(
            env_prefix=role.ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="forbid"
        ),
        "settings_customise_sources": classmethod(settings_customise_sources),
    }
    return cast("type[BaseSettings]", type(role.__name__, (role, BaseSettings), namespace))


def validation_problems(error: ValidationError) -> str:
    """A pydantic error as one line, `field.path: message; ...`, without the values given: a settings file holds
    passwords, and an error message is printed and logged."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'value'}: {problem['msg']}"
        for problem in error.errors(include_url=False, include_input=False, include_context=False)
    )
