"""The agent daemon's lean entry points (midgate_agent.py): `midgate-agent`, which the Raspberry Pi unit runs, and
`midgate agent run` through the `midgate` console script reach the daemon without the CLI stack or what only a job
or a visit to the member page needs (BENCHMARKS.md, "Raspberry Pi hub": idle agent target 50 MB RSS), and say errors
as the typer app does. Each runs in its own interpreter with `-X importtime`, so what it imported is what it listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOT_IN_THE_IDLE_AGENT = (
    "typer",
    "click",
    "rich",
    "coordinator",
    "demo",
    "midgate_cli",
    "uvicorn",
    "uvloop",
    "psutil",
    "numpy",
    "torch",
    "flwr",
    "edge.federated.supernode",
    "edge.federated.supervisor",
    "edge.federated.acceleration",
    "edge.agent.job_task",
    "edge.agent.member_page_view",
    "edge.agent.receipts",
    "edge.agent.statement",
    "pydantic_settings",
    "dotenv",
    "argparse",
)
"""Imported by `midgate agent run` before (the CLI stack, the member page's uvicorn and view, a job's SuperNode
stack, uvloop, psutil, pydantic-settings for a config without env overrides, argparse for `--config PATH`), or never
needed by an idle agent."""

LEAN = "from midgate_agent import main; main()"
CONSOLE = "import sys; from midgate_agent import console; sys.argv[0] = 'midgate'; console()"
TYPER = "from midgate_cli import app; app()"


def _run(code: str, *args: str, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run(
        [sys.executable, *flags, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def _imported(stderr: str) -> set[str]:
    return {line.split("|")[2].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def _unenrolled_config(tmp_path: Path) -> Path:
    """An agent with no membership: `agent run` imports the whole daemon, then stops at once, saying so."""
    config = tmp_path / "agent.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[[sensors]]\ndriver = "linux"\nname = "host"\n')
    return config


@pytest.mark.parametrize(("code", "args"), [(LEAN, []), (CONSOLE, ["agent", "run"])], ids=["midgate-agent", "midgate"])
def test_the_daemon_is_reached_without_the_cli_stack_or_a_jobs_modules(
    tmp_path: Path, code: str, args: list[str]
) -> None:
    done = _run(code, *args, "--config", str(_unenrolled_config(tmp_path)), importtime=True)
    assert "no memberships under" in done.stderr, done.stderr[-2000:]
    imported = _imported(done.stderr)
    assert {"edge.agent.daemon", "edge.agent.session", "aiomqtt", "edge.sensors.linux"} <= imported
    unwanted = sorted(m for m in imported if any(m == n or m.startswith(f"{n}.") for n in NOT_IN_THE_IDLE_AGENT))
    assert unwanted == []


@pytest.mark.parametrize(
    ("config_text", "code", "said"),
    [
        (None, 1, "error: config file {path} not found"),
        ("no_such_key = 1\n", 2, "error: invalid config: no_such_key: Extra inputs are not permitted"),
    ],
    ids=["missing", "invalid"],
)
def test_the_lean_entry_says_errors_as_the_typer_app_does(
    tmp_path: Path, config_text: str | None, code: int, said: str
) -> None:
    path = tmp_path / "agent.toml"
    if config_text is not None:
        path.write_text(config_text)
    runs = {
        "midgate-agent": _run(LEAN, "--config", str(path)),
        "midgate": _run(CONSOLE, "agent", "run", "--config", str(path)),
        "typer": _run(TYPER, "agent", "run", "--config", str(path)),
    }
    for name, done in runs.items():
        assert (done.returncode, done.stderr.strip()) == (code, said.format(path=path)), name


@pytest.mark.parametrize("args", [["-c", "{path}"], ["--config={path}"]], ids=["-c", "--config="])
def test_the_lean_entry_reads_every_form_of_the_config_option(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "missing.toml"
    done = _run(LEAN, *(a.format(path=path) for a in args))
    assert (done.returncode, done.stderr.strip()) == (1, f"error: config file {path} not found")


@pytest.mark.parametrize(
    ("args", "said"),
    [(["--config"], "expected one argument"), (["--bogus"], "unrecognized arguments: --bogus")],
    ids=["no-value", "unknown"],
)
def test_anything_else_is_argparse_s_to_say(args: list[str], said: str) -> None:
    done = _run(LEAN, *args)
    assert done.returncode == 2 and said in done.stderr and done.stderr.startswith("usage: midgate-agent")
    helped = _run(LEAN, "--help")
    assert helped.returncode == 0 and "--config CONFIG, -c CONFIG" in helped.stdout


def test_help_and_every_other_command_go_to_the_typer_app() -> None:
    helped = _run(CONSOLE, "agent", "run", "--help")
    assert helped.returncode == 0 and "Run the agent daemon" in helped.stdout and "--config" in helped.stdout
    listed = _run(CONSOLE, "agent", "--help")
    assert listed.returncode == 0 and "enrol" in listed.stdout and "statement" in listed.stdout


def test_a_visit_to_the_member_page_imports_no_cli_stack() -> None:
    """The page's view (imported at the first visit) shares the member commands' code, not their tables."""
    done = _run("import edge.agent.member_page_view", importtime=True)
    imported = _imported(done.stderr)
    assert done.returncode == 0 and "edge.agent.receipts" in imported and "edge.agent.controls.commands" in imported
    assert sorted(m for m in imported if m.split(".")[0] in ("rich", "typer", "click", "uvicorn")) == []
