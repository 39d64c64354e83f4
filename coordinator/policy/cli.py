"""`midgate coordinator policy show|apply`: the MID's policy versions in the log, and installing a new policy file.

`serve` is the log's one writer, so `apply` only checks the file and installs it at the configured policy path;
`serve` appends its POLICY leaf within a second (or when it next starts), and `apply` waits for that leaf. Imports
live inside the commands: every `midgate` invocation imports the CLI modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, help="The MID's policy: its versions in the ledger; install a new one.")

ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")
FileArgument = typer.Argument(..., exists=True, dir_okay=False, help="the new policy (TOML, README)")
APPLY_WAIT_S = 30.0


@app.command()
def show(
    as_json: bool = typer.Option(False, "--json", help="the current version's full record as JSON"),
    config: Path | None = ConfigOption,
) -> None:
    """Every policy version in the ledger (version, leaf, applied at, fee, hash), the current one in full, and
    whether the configured policy differs from it (then `serve` logs it as the next version)."""
    from coordinator.config import CoordinatorSettings
    from coordinator.ledger.store import LedgerReader
    from coordinator.policy.document import configured_policy
    from coordinator.policy.ledger_records import iter_policies
    from protocol.errors import ProtocolError

    settings = CoordinatorSettings.load_for_command(config)
    versions = []
    if settings.ledger_path.exists():
        with LedgerReader.open_existing(settings.ledger_path) as reader:
            versions = list(iter_policies(reader))
    try:
        configured = configured_policy(settings)
        pending = "" if versions and versions[-1].record.policy_sha256 == configured.content_sha256() else "differs"
    except ProtocolError as error:
        pending = f"refused ({error})"
    if as_json:
        record = versions[-1].record.model_dump(mode="json") if versions else None
        typer.echo(json.dumps({"current": record, "versions": len(versions), "configured": pending or "logged"}))
        return
    if not versions:
        typer.echo("no POLICY leaf yet: `coordinator serve` logs the configured policy as version 1 when it starts")
    else:
        typer.echo("version\tleaf\tapplied_ms\tfee_bps\tpolicy_sha256")
        for logged in versions:
            r = logged.record
            typer.echo(f"{r.version}\t{logged.index}\t{r.applied_ms}\t{r.policy.fee_bps}\t{r.policy_sha256}")
        current = versions[-1].record.policy
        typer.echo(f"current: version {versions[-1].version}")
        typer.echo(json.dumps(current.model_dump(mode="json"), indent=1, sort_keys=True))
    source = settings.policy_path if settings.policy_path.exists() else "[royalties] of the config"
    if pending == "differs":
        typer.echo(f"configured policy ({source}) differs: `serve` logs it as the next version")
    elif pending:
        typer.echo(f"configured policy ({source}) {pending}")


@app.command()
def apply(
    policy_file: Path = FileArgument,
    timeout: float = typer.Option(APPLY_WAIT_S, help="seconds to wait for `serve` to log it"),
    config: Path | None = ConfigOption,
) -> None:
    """Check a policy file (a fee above 30 % or a file that is not a policy is refused, exit 2), install it as the
    MID's policy file and wait for `serve` to log it as the next POLICY version; quotes made after that use it,
    running and settled jobs keep theirs. Exits 1 when `serve` did not log it in time (it does when it runs)."""
    import os
    import time

    from coordinator.config import CoordinatorSettings
    from coordinator.ledger.store import LedgerReader
    from coordinator.policy.document import parse_policy
    from coordinator.policy.ledger_records import current_policy, iter_policies
    from protocol.errors import ProtocolError

    settings = CoordinatorSettings.load_for_command(config)
    data = policy_file.read_bytes()
    try:
        policy = parse_policy(data, str(policy_file))
    except ProtocolError as error:
        typer.echo(f"policy refused: {error}", err=True)
        raise typer.Exit(2) from None
    digest = policy.content_sha256()
    start = 0
    if settings.ledger_path.exists():
        with LedgerReader.open_existing(settings.ledger_path) as reader:
            current = current_policy(reader)
            start = reader.size
        if current is not None and current.record.policy_sha256 == digest:
            typer.echo(f"unchanged: this is policy version {current.version} (leaf {current.index}); nothing to log")
            return
    target = settings.policy_path
    if target.resolve() != policy_file.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    typer.echo(f"installed: {target} (policy sha256 {digest})")
    deadline = time.monotonic() + timeout
    while True:
        if settings.ledger_path.exists():
            with LedgerReader.open_existing(settings.ledger_path) as reader:
                for logged in iter_policies(reader, start):
                    if logged.record.policy_sha256 == digest:
                        typer.echo(f"logged: POLICY leaf {logged.index}, version {logged.version}")
                        return
                start = reader.size
        if time.monotonic() >= deadline:
            typer.echo(f"not in the ledger after {timeout:.0f} s: `coordinator serve` logs it when it runs", err=True)
            raise typer.Exit(1)
        time.sleep(0.25)
