"""docs/architecture.md names where each part lives: every path it names must exist, and every coordinator package must
be placed in its layer table, so the map cannot drift from the tree."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"


def _named_paths(text: str) -> set[str]:
    return {m for m in re.findall(r"`([a-z_]+/[a-z_/]*(?:\.py)?)`", text) if not m.startswith(("mid/", "up/", "down/"))}


def test_every_path_the_architecture_doc_names_exists() -> None:
    text = DOC.read_text()
    named = _named_paths(text)
    assert len(named) > 15
    missing = []
    for path in named:
        candidates = [REPO / path, REPO / "coordinator" / path, REPO / "edge" / path, REPO / "edge" / "agent" / path]
        if not any(c.exists() for c in candidates):
            missing.append(path)
    assert missing == []


def test_every_coordinator_package_is_in_the_layer_table() -> None:
    text = DOC.read_text()
    table = text[text.index("| layer |") :]
    packages = sorted(p.name for p in (REPO / "coordinator").iterdir() if (p / "__init__.py").exists())
    modules = sorted(p.name for p in (REPO / "coordinator").glob("*.py") if p.name != "__init__.py")
    absent = [name for name in packages if f"`{name}/`" not in table] + [m for m in modules if f"`{m}`" not in table]
    assert absent == []
