"""An agent's data as a member configures it: `[[sensors]]` in agent.toml replaying chosen PLAID recordings, loaded by
`agent run` itself into its sample store; and a wait for that load, read from the store without disturbing the agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mqtt_fixtures import wait_until

from edge.sensors.errors import MalformedError
from edge.sensors.store import SampleStore


def plaid_sensor_toml(series: str | Sequence[int], name: str = "plaid") -> str:
    """A `[[sensors]]` table replaying PLAID training recordings `series` (indices, or a slice such as "0:20") as fast
    as the store takes them."""
    chosen = f'"{series}"' if isinstance(series, str) else "[" + ", ".join(str(int(i)) for i in series) + "]"
    return f'\n[[sensors]]\ndriver = "replay"\nname = "{name}"\nspeed = "max"\nseries = {chosen}\n'


def sensor_state(store: Path, sensor: str) -> str | None:
    """The state the agent last recorded for `sensor` (None: no store or no record yet)."""
    try:
        with SampleStore(store, readonly=True) as opened:
            states = {h.name: h.state for h in opened.health()}
    except MalformedError:
        return None
    return states.get(sensor)


def wait_loaded(store: Path, sensor: str = "plaid", timeout_s: float = 90) -> None:
    """Until the agent has loaded `sensor`'s replay into its store (polls the store's health table)."""
    wait_until(lambda: sensor_state(store, sensor) == "loaded", timeout_s, f"{sensor} loaded into {store}", 0.2)
