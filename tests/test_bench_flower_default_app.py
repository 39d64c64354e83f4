"""The Flower app `fl_bench.py rounds` submits for its flower-default configuration (fl_bench.flower_default_app):
midgate's app with the bench's ServerApp, which the FAB carries, so the SuperLink's ServerApp process imports it."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.cli.config_utils import load_and_validate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ is scripts, not an installed package

from fl_bench import APP_DIR, flower_default_app


def test_the_flower_default_app_is_midgates_app_with_the_benchs_serverapp(tmp_path: Path) -> None:
    app = flower_default_app(tmp_path / "app")

    # `flwr run`'s own check: each component's module is found, the ServerApp's in the app's directory.
    bench, _ = load_and_validate(app / "pyproject.toml", check_module=True)
    production, _ = load_and_validate(APP_DIR / "pyproject.toml", check_module=True)
    ours, theirs = bench["tool"]["flwr"]["app"], production["tool"]["flwr"]["app"]
    assert ours["components"] == theirs["components"] | {"serverapp": "flower_default_server:app"}
    assert ours["config"] == theirs["config"]  # the same run-config keys and defaults, for the ClientApp too
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app)))
    assert "flower_default_server.py" in fab.namelist()
