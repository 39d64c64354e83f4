"""`midgate coordinator` commands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from coordinator.broker.cli import app as relay_app
from coordinator.dashboard.cli import operator_app, report_command
from coordinator.federation.job_cli import app as job_app
from coordinator.market.cli import operator_app as buyer_app
from coordinator.market.cli import task_approve, task_proposals
from coordinator.policy.cli import app as policy_app
from coordinator.royalties.cli import app as royalties_app
from coordinator.tasks.cli import app as task_app

if TYPE_CHECKING:
    from coordinator.config import CoordinatorSettings

app = typer.Typer(
    no_args_is_help=True, help="MID operator commands: serve the coordinator, broker configuration, invites, registry."
)

ConfigOption = typer.Option(None, "--config", "-c", help="coordinator.toml (env MIDGATE_COORDINATOR_* overrides)")
OutputDirOption = typer.Option(None, help="where to write mosquitto.conf, acl, passwords, TLS files")
TlsOption = typer.Option(True, help="write a TLS listener with the MID's own CA")

# Statements and revenue records over the ledger; that module imports its record code only when a command runs.
app.add_typer(royalties_app, name="royalties")
# Training jobs on the MID's SuperLink: `job start`, `job list`, `job show`; `job report` is the dashboard's (it sits
# above the job commands' module in the layers, so it is mounted here).
job_app.command("report")(report_command)
app.add_typer(job_app, name="job")
# The dashboard's login: `operator passwd`.
app.add_typer(operator_app, name="operator")
# Task specs the MID signs and serves: `task add`, `task list`, `task show`; `task proposals` and `task approve JOB`
# (specs buyers proposed) are the market's (it sits above the task commands' module in the layers).
task_app.command("proposals")(task_proposals)
task_app.command("approve")(task_approve)
app.add_typer(task_app, name="task")
# Buyers allowed to use the buyer job API: `buyer add`, `buyer revoke`, `buyer list`.
app.add_typer(buyer_app, name="buyer")
# The MID's policy file and its POLICY leaves: `policy show`, `policy apply FILE`.
app.add_typer(policy_app, name="policy")
# Members' hubs that bridge their other devices to the broker: `relay add`, `relay list`, `relay revoke`.
app.add_typer(relay_app, name="relay")


# Imports live inside the commands: every `midgate` invocation (the agent's too) imports this module.
def _settings(config: Path | None) -> CoordinatorSettings:
    from coordinator.config import CoordinatorSettings

    return CoordinatorSettings.load_for_command(config)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


LogLevelOption = typer.Option(
    "info", "--log-level", help="debug: also one line per report accepted or refused; warning: problems only"
)


def _log_level(name: str) -> int:
    levels = {"debug": 10, "info": 20, "warning": 30, "error": 40}  # logging's own numbers
    if name.lower() not in levels:
        raise typer.BadParameter(f"one of {', '.join(levels)}", param_hint="--log-level")
    return levels[name.lower()]


@app.command()
def serve(config: Path | None = ConfigOption, log_level: str = LogLevelOption) -> None:
    """Run ingest (MQTT -> verify -> dedup -> ledger -> receipts) and the enrolment/ledger HTTP API; logs `ready`
    with its addresses once it is up."""
    from coordinator.serve.assembly import serve as serve_process
    from coordinator.serve.runtime import configure_logging, run_service

    settings = _settings(config)
    configure_logging(settings.log_json, _log_level(log_level))
    run_service(serve_process(settings))


@app.command("ingest-worker")
def ingest_worker(
    config: Path | None = ConfigOption,
    worker_id: str = typer.Option(..., "--worker-id", help="unique per worker ([a-z0-9-]); names its broker session"),
    metrics_port: int | None = typer.Option(None, help="serve Prometheus /metrics on this port (0: any free port)"),
    metrics_host: str = typer.Option("127.0.0.1", help="address of the metrics endpoint"),
    log_level: str = LogLevelOption,
) -> None:
    """Run one screening worker: MQTT 5 shared subscription -> verify -> authenticated hand-off to `serve`."""
    from coordinator.ingest.worker import run_worker
    from coordinator.serve.runtime import configure_logging, run_service

    settings = _settings(config)
    configure_logging(settings.log_json, _log_level(log_level))
    run_service(run_worker(settings, worker_id, metrics_port, metrics_host))


@app.command("broker-config")
def broker_config(
    config: Path | None = ConfigOption,
    output_dir: Path | None = OutputDirOption,
    tls: bool = TlsOption,
) -> None:
    """Write a complete Mosquitto configuration (TLS listener, password file, ACLs, queue sizing, persistence, log,
    pid file) owned for the account Mosquitto runs as, and a systemd drop-in for Debian's mosquitto.service."""
    from coordinator.broker.config import broker_files, write_broker_files
    from coordinator.broker.logins import broker_password_hashes
    from coordinator.broker.owners import BrokerFilesError, broker_account, folders_the_broker_cannot_enter
    from coordinator.broker.tls import ensure_broker_tls
    from coordinator.registry.store import Registry

    settings = _settings(config)
    files = broker_files(settings, output_dir)
    try:
        account = broker_account(settings.broker_config.user)
    except BrokerFilesError as error:
        typer.echo(f"broker-config: {error}", err=True)
        raise typer.Exit(2) from None
    tls_files = ensure_broker_tls(files.tls_dir, settings.mid, settings.broker_config.tls_hostnames) if tls else None
    registry = Registry(settings.registry_path)
    try:
        hashes, relays = broker_password_hashes(registry, settings), registry.relay_devices()
    finally:
        registry.close()
    write_broker_files(
        files,
        settings.broker_config,
        settings.mid,
        settings.broker.username,
        hashes,
        tls_files,
        account,
        settings.ingest.worker_ids,
        relays,
    )
    typer.echo(f"wrote {files.config}, {files.acl}, {files.passwords} ({len(hashes)} logins)")
    if tls_files is not None:
        typer.echo(f"MID CA certificate for devices: {tls_files.ca_cert}")
    if account is None:
        typer.echo("not run as root: every file stays with this user, so run Mosquitto as this user too")
    else:
        typer.echo(f"owned for Mosquitto's account {account.name} (group {account.group})")
        for folder in folders_the_broker_cannot_enter(files.directory, account):
            typer.echo(f"warning: {account.name} cannot enter {folder}; Mosquitto will not reach its files", err=True)
    if files.directory.resolve() != settings.broker_config.output_dir.resolve():
        typer.echo(
            f"warning: `serve` rewrites the logins in {settings.broker_config.output_dir}: set [broker_config] "
            f"output_dir to {files.directory}",
            err=True,
        )
    typer.echo(f"run: mosquitto -c {files.config}   (as root: it drops to {settings.broker_config.user})")
    typer.echo(f"systemd: install {files.systemd_dropin} as /etc/systemd/system/mosquitto.service.d/midgate.conf")


@app.command()
def invite(
    member: str = typer.Argument(..., help="member id ([a-z0-9-])"),
    config: Path | None = ConfigOption,
    ttl_s: int | None = typer.Option(None, help="seconds until the invite expires (default from config)"),
) -> None:
    """Create a single-use, expiring invite signed by the MID key; prints the token to hand to the member."""
    from coordinator.enrolment.enroller import issue_invite
    from coordinator.mid_key import load_or_create_mid_key
    from coordinator.registry.store import Registry
    from protocol.private_files import private_dir
    from protocol.topics import check_id

    settings = _settings(config)
    check_id(member, "member")
    private_dir(settings.data_dir)
    key = load_or_create_mid_key(settings.mid_key_file, settings.mid)
    registry = Registry(settings.registry_path)
    try:
        token = issue_invite(registry, key, settings.mid, member, _now_ms(), ttl_s or settings.enrolment.invite_ttl_s)
    finally:
        registry.close()
    typer.echo(token)


@app.command()
def revoke(device: str = typer.Argument(...), config: Path | None = ConfigOption) -> None:
    """Revoke a device key: ingest refuses it from the next batch, and its broker login is removed. `serve` (the
    ledger's one writer) logs a MID-signed key-revoke leaf within a second, or at its next start if it is down."""
    from coordinator.broker.cli import revoke_login

    revoke_login(_settings(config), lambda registry, now_ms: registry.revoke(device, now_ms), f"device {device}")


DEVICE_COLUMNS = ("device", "member", "key", "online", "last_seen", "status", "paused", "striking", "left", "verifier")


@app.command()
def devices(config: Path | None = ConfigOption) -> None:
    """Enrolled devices, one a line under a header (tab-separated): whether the key is active or revoked, whether
    the device is online and when the MID last heard from it, and what its member said in signed messages: paused,
    striking (and against whom), left. `serve` keeps this in the registry as it hears it (docs/messaging.md,
    "Presence")."""
    from coordinator.registry.presence import active_strikes
    from coordinator.registry.store import Registry
    from protocol.messages import DeviceStatus

    settings = _settings(config)
    now = _now_ms()
    registry = Registry(settings.registry_path)
    try:
        enrolled, heard = registry.devices(), registry.presence()
        striking = active_strikes(registry.strike_votes(), now)
        departed = registry.departures()
    finally:
        registry.close()
    if not enrolled:
        typer.echo("no devices enrolled yet (`midgate coordinator invite MEMBER` makes an invite)")
        return
    typer.echo("\t".join(DEVICE_COLUMNS))
    offline_after_ms = settings.ingest.heartbeat_offline_s * 1000
    for d in enrolled:
        presence = heard.get(d.device_id)
        status = presence.status if presence is not None else None
        departure = departed.get(d.device_id)
        if departure is not None:  # its logged LeaveNotice: a heartbeat after it is refused (revoked key)
            status = DeviceStatus.LEFT
        online = "-" if presence is None else "yes" if presence.online(now, offline_after_ms) else "no"
        seen = "never" if presence is None else f"{_utc(presence.last_seen_ms)} ({_ago(now - presence.last_seen_ms)})"
        since = "" if presence is None else f"since {_utc(presence.status_ms)}"
        row = (
            d.device_id,
            d.member_id,
            "revoked" if d.revoked else "active",
            online,
            seen,
            str(status) if status is not None else "-",
            since if status is DeviceStatus.PAUSED else "no",
            "; ".join(s.target_text() for s in striking.get(d.device_id, [])) or "no",
            f"since {_utc(departure.left_ms)}" if departure else since if status is DeviceStatus.LEFT else "no",
            d.verifier.text(),
        )
        typer.echo("\t".join(row))


@app.command()
def strikes(config: Path | None = ConfigOption) -> None:
    """Strikes members vote now, one target a line under a header (tab-separated): how many members strike against
    it, how many the quorum needs (the policy's `[strikes]`: quorum_bps of the active members, at least min_members),
    whether it is in force (new jobs for the target are refused with reason `strike`), who strikes, and what the
    ledger last logged about it (the STRIKE_QUORUM leaf `serve` appends within a second of a strike coming into force
    or ending). Every vote is a strike leaf in the ledger."""
    from coordinator.ledger.store import LedgerReader
    from coordinator.policy.in_force import policy_in_force
    from coordinator.policy.strike_quorum import logged_strikes
    from coordinator.registry.store import Registry
    from coordinator.registry.strikes import StrikeTally

    settings = _settings(config)
    strikes = policy_in_force(settings)[0].strikes
    registry = Registry(settings.registry_path)
    try:
        votes, devices = registry.strike_votes(), registry.devices()
        tally = StrikeTally(votes, devices, strikes.quorum_bps, _now_ms(), strikes.min_members)
    finally:
        registry.close()
    logged = {}
    if settings.ledger_path.exists():
        with LedgerReader.open_existing(settings.ledger_path) as reader:
            logged = logged_strikes(reader)
    counts = tally.counts()
    typer.echo(
        f"{tally.active_members} active member(s); quorum {tally.needed}"
        f" ({strikes.quorum_bps / 100:g} % of them, at least {strikes.min_members}); running jobs"
        f" {strikes.running_jobs} when a strike comes into force"
    )
    if not counts:
        typer.echo("no strike votes in force")
        return
    typer.echo("\t".join(("target", "strikers", "quorum", "in_force", "members", "logged")))
    for count in counts:
        last = logged.get(count.target)
        said = "-" if last is None else f"{'in force' if last[1].in_force else 'ended'} at leaf {last[0]}"
        row = (
            count.target.text(),
            str(len(count.strikers)),
            str(count.needed),
            "yes" if count.in_force else "no",
            ",".join(count.strikers),
            said,
        )
        typer.echo("\t".join(row))


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


def _ago(ms: int) -> str:
    seconds = max(0, ms // 1000)
    if seconds < 120:
        return f"{seconds} s ago"
    return f"{seconds // 60} min ago" if seconds < 7200 else f"{seconds // 3600} h ago"


EvidenceDirOption = typer.Option(None, help="write each refused report's signed envelope here")


@app.command()
def flags(
    config: Path | None = ConfigOption,
    device: str | None = typer.Option(None, help="only this device"),
    all_refusals: bool = typer.Option(False, "--all", help="also refusals that flag no one (dropped, never captured)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line, evidence included"),
    evidence_dir: Path | None = EvidenceDirOption,
) -> None:
    """Devices flagged for contribution reports whose signed update hash is not what Flower delivered, with the
    evidence: the signed envelope, what the round's capture holds, and the reason."""
    import base64
    import json

    from coordinator.gate.gate import ContributionStore

    settings = _settings(config)
    if not settings.contributions_path.exists():
        return
    store = ContributionStore(settings.contributions_path)
    try:
        refusals = store.refusals(flagged_only=not all_refusals, device=device)
    finally:
        store.close()
    if evidence_dir is not None:
        evidence_dir.mkdir(parents=True, exist_ok=True)
    for r in refusals:
        if evidence_dir is not None:
            (evidence_dir / f"{r.device}-{r.seq}.dsse.json").write_bytes(r.envelope)
        if as_json:
            doc = {
                "device": r.device,
                "key_id": r.key_id,
                "seq": str(r.seq),
                "run_id": str(r.run_id),
                "round": r.round,
                "node_id": str(r.node_id),
                "reason": r.reason,
                "flagged": r.flagged,
                "detail": r.detail,
                "capture": r.capture,
                "envelope_sha256": r.envelope_sha256,
                "envelope_b64": base64.b64encode(r.envelope).decode(),
                "refused_ms": r.refused_ms,
            }
            typer.echo(json.dumps(doc, sort_keys=True))
        else:
            flag = "FLAGGED" if r.flagged else "refused"
            typer.echo(
                f"{r.device}\t{flag}\t{r.reason}\tseq={r.seq}\trun={r.run_id}\tround={r.round}\tnode={r.node_id}"
                f"\treported={r.capture.get('reported_update_sha256')}\tcaptured={r.capture.get('update_sha256')}"
            )
