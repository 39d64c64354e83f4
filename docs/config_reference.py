"""Print the configuration reference of every role from its settings model, for README.md.

    python docs/config_reference.py            # print the Markdown tables
    python docs/config_reference.py --write    # replace the block between the config-reference markers in README.md

tests/test_readme_config.py fails when README.md's block differs from what the models say, so the reference cannot
drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from protocol.settings import RoleSettings

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _roles() -> list[tuple[str, str, type[RoleSettings]]]:
    from coordinator.config import CoordinatorSettings
    from edge.agent.config import AgentSettings

    return [
        ("agent.toml", "midgate agent … --config agent.toml", AgentSettings),
        ("coordinator.toml", "midgate coordinator … --config coordinator.toml", CoordinatorSettings),
    ]


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(table)"
    if isinstance(value, Path):
        value = str(value)
    return f"`{value!r}`" if value not in (None, [], {}) else f"`{value}`"


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(f"`{choice!r}`" for choice in get_args(annotation))
    text = getattr(annotation, "__name__", None) if get_origin(annotation) is None else None
    text = text or str(annotation)
    if "Annotated[" in text:
        return "array of tables"
    return text.replace("typing.", "").replace("pathlib.", "").replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str, env: str) -> list[str]:
    rows: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(_rows(annotation, f"{prefix}{name}.", f"{env}{name.upper()}__"))
            continue
        description = (field.description or "").replace("|", "\\|")
        cells = [f"`{prefix}{name}`", _type_name(annotation), _default(field), f"`{env}{name.upper()}`", description]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def reference() -> str:
    parts = []
    for filename, usage, model in _roles():
        env_prefix = model.ENV_PREFIX
        doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
        parts.append(f"### `{filename}` ({usage})\n\n{doc}\n".rstrip() + "\n")
        parts.append("| key | type | default | environment | meaning |\n|---|---|---|---|---|")
        parts.extend(_rows(model, "", env_prefix))
        parts.append("")
    return "\n".join(parts)


def readme_block(text: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n")


def main() -> None:
    generated = reference()
    if "--write" not in sys.argv:
        print(generated)
        return
    text = README.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    README.write_text(text[:start] + "\n" + generated + "\n" + text[end:])


if __name__ == "__main__":
    main()
