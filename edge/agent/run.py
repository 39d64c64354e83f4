"""The agent daemon's process: what `midgate agent run` and the lean `midgate-agent` console script both run.

Kept apart from the member commands (edge.agent.cli) so that the daemon's process imports no CLI stack: on a
Raspberry Pi hub typer, click and rich would stay resident for the daemon's lifetime (BENCHMARKS.md, "Raspberry Pi
hub": idle agent target 50 MB RSS).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path


def run_daemon(config: Path | None) -> None:
    """Load the agent's settings from `config` and serve every membership until SIGTERM/SIGINT."""
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

    # asyncio's own loop, not uvloop (which the coordinator runs): the agent's loop carries a few messages a second,
    # and uvloop's library would add about 1.6 MB to the idle agent (BENCHMARKS.md, "Raspberry Pi hub").
    asyncio.run(main())
