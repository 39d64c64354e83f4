"""What every `midgate` command says when it ends on an error the user can cause or meet: one line and an exit code.

Shared by the typer app (midgate_cli) and the lean `midgate-agent` daemon script (midgate_agent), which must not
import the CLI stack; so it imports nothing beyond the standard library until an error is said.
"""

from __future__ import annotations

import sys


def exit_if_expected(error: BaseException) -> None:
    """End the process with one line on stderr for an interrupt (exit 130) or an expected error (`expected_error`);
    return for anything else, a bug, which the caller re-raises with its traceback."""
    if isinstance(error, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    said = expected_error(error) if isinstance(error, Exception) else None
    if said is not None:
        print(f"error: {said[0]}", file=sys.stderr)
        raise SystemExit(said[1]) from None


def expected_error(error: Exception) -> tuple[str, int] | None:
    """(one line, exit code) for an error the user can cause or meet; None for a bug. The line never holds the
    values a settings model was given, only where and what is wrong (protocol.settings.validation_problems)."""
    import sqlite3
    import urllib.error

    from pydantic import ValidationError

    from protocol.errors import ProtocolError
    from protocol.settings import validation_problems

    if isinstance(error, ValidationError):
        what = "config" if error.title.endswith("Settings") else error.title
        return f"invalid {what}: {validation_problems(error)}", 2
    if isinstance(error, ProtocolError):
        return str(error), 1
    if isinstance(error, urllib.error.URLError):
        return f"cannot reach the server: {error.reason}", 1
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return f"no such file or folder: {error.filename}", 1
    if isinstance(error, PermissionError) and error.filename is not None:
        return f"permission denied: {error.filename}", 1
    if isinstance(error, OSError):
        return str(error) or type(error).__name__, 1
    if isinstance(error, sqlite3.Error):
        return f"database: {error}", 1
    return None
