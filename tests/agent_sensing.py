"""An agent's data as a member configures it: `[[sensors]]` in agent.toml replaying chosen PLAID recordings, loaded by
`agent run` itself into its sample store; and a wait for that load, read from the store without disturbing the agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mqtt_fixtures import free_port, wait_until

from edge.agent.membership import MembershipRecord, save_membership
from edge.sensors.errors import MalformedError
from edge.sensors.store import SampleStore
from protocol.enrolment import BrokerCredentials
from protocol.identity import SignerKey, save_signer_key


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


def member_of_an_unreachable_mid(data_dir: Path) -> None:
    """A membership under `data_dir` whose MID's broker and enrolment URL answer nothing: `agent run` serves its
    sensors while it keeps trying to connect."""
    directory = data_dir / "mids" / "riverside"
    record = MembershipRecord(
        mid="riverside",
        device="d-1",
        member="ann",
        mid_key=SignerKey.generate("riverside").verifier.text(),
        enrolment_url="http://127.0.0.1:1",
        broker=BrokerCredentials(host="127.0.0.1", port=free_port(), username="d-1", password="x" * 16, tls=False),
        enrolled_ms=1,
    )
    save_membership(directory, record)
    save_signer_key(directory / "device.key", SignerKey.generate("d-1"))
