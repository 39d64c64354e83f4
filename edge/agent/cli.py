"""`midgate agent` commands."""

from __future__ import annotations

from pathlib import Path

import typer

from edge.sensors.cli import app as sensors_app

app = typer.Typer(
    no_args_is_help=True,
    help="Member commands: run the agent daemon, enrol, sensors, knob, consent, pause, strike, statements.",
)
app.add_typer(sensors_app, name="sensors")


ConfigOption = typer.Option(None, "--config", "-c", help="agent.toml (env MIDGATE_AGENT_* overrides)")
MidOption = typer.Option(..., "--mid", help="the MID's enrolment URL, e.g. https://mid.example.org")
InviteOption = typer.Option(..., "--invite", help="the invite token the MID operator gave you")


@app.command()
def enrol(mid: str = MidOption, invite: str = InviteOption, config: Path | None = ConfigOption) -> None:
    """Join a MID: make a key for it alone, prove possession, receive broker credentials and an enrolment receipt."""
    from edge.agent.config import AgentSettings
    from edge.agent.enrolment import enrol as enrol_with

    record = enrol_with(AgentSettings.load(config), mid, invite)
    typer.echo(f"enrolled in {record.mid} as device {record.device} (member {record.member})")


@app.command()
def run(config: Path | None = ConfigOption) -> None:
    """Run the agent daemon for every MID this agent belongs to (until SIGTERM/SIGINT)."""
    import asyncio
    import logging
    import signal

    from edge.agent.config import AgentSettings
    from edge.agent.daemon import run_agent

    settings = AgentSettings.load(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_agent(settings, stop)

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
