"""An earlier commit's files beside this tree, for the benches that run a named baseline's code in the same run."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export_revision(revision: str, into: Path, *paths: str) -> Path:
    """`revision`'s files (all of them, or only `paths`), extracted with `git archive` into a new folder under
    `into`; returns that folder."""
    root = into / f"rev-{revision}"
    root.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, *paths], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    return root
