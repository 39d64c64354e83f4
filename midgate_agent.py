"""The `midgate-agent` console script: the member's agent daemon, `midgate agent run` without the CLI stack.

A Raspberry Pi hub's systemd unit runs this. It takes the options `midgate agent run` takes and says errors the same
way (midgate_errors), but imports neither typer, click and rich nor the other roles' commands: they would stay
resident for the daemon's lifetime, about 2 MB of a 50 MB budget (BENCHMARKS.md, "Raspberry Pi hub"). `midgate`
itself enters through `console`, so `midgate agent run` is as lean; every other command goes to midgate_cli.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from midgate_errors import exit_if_expected

RUN_COMMAND = ["agent", "run"]
HELP_FLAGS = {"--help", "-h"}


def main(argv: Sequence[str] | None = None, prog: str = "midgate-agent") -> None:
    """Run the agent daemon for every MID this agent belongs to (until SIGTERM/SIGINT)."""
    config = _config_path(sys.argv[1:] if argv is None else argv, prog)
    from edge.agent.run import run_daemon

    try:
        run_daemon(config)
    except (KeyboardInterrupt, Exception) as error:
        exit_if_expected(error)
        raise


def _config_path(argv: Sequence[str], prog: str) -> Path | None:
    """The config file of the command lines a service runs (none, `--config PATH`, `-c PATH`, `--config=PATH`) read
    without argparse, which would stay resident in the daemon (0.4 MB of its 50 MB budget on a Pi hub: BENCHMARKS.md,
    "Raspberry Pi hub"); anything else (--help, a mistake) goes to argparse, which says it as it always has."""
    match list(argv):
        case []:
            return None
        case ["--config" | "-c", value] if value and not value.startswith("-"):
            return Path(value)
        case [option] if option.startswith("--config=") and option != "--config=":
            return Path(option.removeprefix("--config="))
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("--config", "-c", type=Path, default=None, help="agent.toml (env MIDGATE_AGENT_* overrides)")
    config: Path | None = parser.parse_args(argv).config
    return config


def console() -> None:
    """The `midgate` console script: `midgate agent run` here, its help and every other command in midgate_cli."""
    if sys.argv[1:3] == RUN_COMMAND and not HELP_FLAGS & set(sys.argv[3:]):
        main(sys.argv[3:], prog="midgate agent run")
        return
    from midgate_cli import app

    app()
