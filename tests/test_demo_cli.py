"""The interim `midgate demo`: every step has its expected outcome, and a changed outcome fails the demo."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from rich.console import Console

from demo import cli
from protocol.errors import Reason


def _run(tmp_path: Path) -> tuple[bool, str]:
    out = io.StringIO()
    ok = cli.run(tmp_path, Console(file=out, width=200))
    return ok, out.getvalue()


def test_demo_shows_every_rejection_with_its_reason_code(tmp_path: Path) -> None:
    ok, text = _run(tmp_path)
    assert ok
    for reason in ("bad_signature", "unknown_key", "replayed", "too_large", "insecure_key_file"):
        assert text.count(reason) == 2, reason  # expected and got columns
    assert "accepted signer=dev-a" in text
    for part, _ in cli.NOT_YET:
        assert part in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev-a.key", "dev-b.key", "mid-demo.key"]


def test_demo_fails_when_an_outcome_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tampering that goes unnoticed must turn the demo red, not pass silently.
    monkeypatch.setattr(cli, "_tampered", lambda envelope: envelope)
    ok, text = _run(tmp_path)
    assert not ok
    assert "an outcome differed" in text
    assert str(Reason.BAD_SIGNATURE) in text


def test_plain_midgate_demo_runs_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from midgate_cli import app

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "all outcomes as expected" in result.output
    assert list(tmp_path.iterdir()) == []
