"""README.md's configuration reference is generated from the settings models and must match them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]


def _generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_reference_matches_the_settings_models() -> None:
    generator = _generator()
    in_readme = generator.readme_block((ROOT / "README.md").read_text())
    assert in_readme == generator.reference().strip("\n"), "run: .venv/bin/python docs/config_reference.py --write"


def test_every_setting_is_described() -> None:
    generator = _generator()
    missing = []
    for _, _, model in generator._roles():
        stack: list[tuple[str, type[BaseModel]]] = [("", model)]
        while stack:
            prefix, current = stack.pop()
            for name, field in current.model_fields.items():
                annotation = field.annotation
                if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                    stack.append((f"{prefix}{name}.", annotation))
                elif not field.description:
                    missing.append(f"{model.__name__}: {prefix}{name}")
    assert not missing, "settings without a description (README reference): " + ", ".join(missing)


def test_the_log_origin_the_readme_names_is_the_one_the_ledger_signs(tmp_path: Path) -> None:
    """README says the log's origin is midgate/{mid}: a coordinator's checkpoint must carry exactly that origin."""
    from coordinator.ledger.store import LedgerStore
    from coordinator.mid_key import load_or_create_mid_key
    from protocol.checkpoint import parse_checkpoint_text
    from protocol.note import parse_note

    assert "its log's origin (and MID key name) is midgate/{mid}" in (ROOT / "README.md").read_text()
    key = load_or_create_mid_key(tmp_path / "mid.key", "riverside")
    with LedgerStore.open(tmp_path / "ledger.sqlite", key) as store:
        store.append([b"leaf"])
        origin = parse_checkpoint_text(parse_note(store.checkpoint()).text).origin
    assert origin == "midgate/riverside"
