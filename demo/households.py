"""The demo's members: households, each replaying its own disjoint share of PLAID's recordings through its agent.

Every household's `agent.toml` lists one `[[sensors]]` replay of the PLAID recordings it holds (by index), which
`agent run` loads into the household's own sample store; when invited to a job, the agent cuts the task's windows
from that store itself. The demo only decides who holds which recordings.

The planted free rider: an agent cannot be configured to send back an update trained on nothing (its ClientApp
always trains on the windows its store gives, and a store giving fewer than `min_job_windows` declines the job), so
the demo plants the closest real thing: a member holding ten recordings of one appliance that the other households
already have plenty of, joining the job to be paid for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from edge.sensors.plaid import PLAID_CLASSES, load_plaid_series

SENSOR = "plaid"
RIDER_CLASS = "compact_fluorescent_lamp"
RIDER_RECORDINGS = 10
"""The fewest windows an agent joins a job with (agent.toml `min_job_windows`' default)."""
SHARE_SEED = 0


class Role(StrEnum):
    HOUSEHOLD = "household"
    FREE_RIDER = "free rider"
    STRIKES = "strikes"
    PAUSES = "pauses"

    @property
    def sits_out(self) -> bool:
        """The member tells the MID before the job that it will not take part (a strike against the job's buyer,
        a pause), so `job start` neither invites it nor waits for it."""
        return self in (Role.STRIKES, Role.PAUSES)


@dataclass(frozen=True)
class Household:
    """One member and its device: the recordings it replays and what it does in the demo."""

    member: str
    role: Role
    series: tuple[int, ...]
    """Indices of PLAID training recordings this household's agent replays."""
    classes: tuple[str, ...]
    """The appliances among them, most recordings first."""
    folder: Path

    @property
    def config(self) -> Path:
        return self.folder / "agent.toml"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def store(self) -> Path:
        return self.data_dir / "samples.db"

    def agent_toml(self, mqtt_protocol: str = "auto") -> str:
        """The member's agent.toml: its data folder and the replay of its recordings into its sample store;
        `mqtt_protocol` "3.1.1" for a broker that speaks nothing newer."""
        series = ", ".join(str(i) for i in self.series)
        return (
            f'data_dir = "{self.data_dir}"\n'
            f'mqtt_protocol = "{mqtt_protocol}"\n'
            "# Receipts come back within a second or two here; the default (15 s) suits devices on slow links.\n"
            "resend_after_s = 5.0\n"
            "# Cosign the MID's checkpoints every 2 s (default 30 s), so statements verify right after a settlement.\n"
            "witness_every_s = 2.0\n"
            "# Five agents on one host: each serves its member page on a free port (data/member-page.url).\n"
            "member_page_port = 0\n"
            "\n[[sensors]]\n"
            'driver = "replay"          # PLAID from the installed sktime wheel\n'
            f'name = "{SENSOR}"\n'
            'speed = "max"             # load the recordings once, as fast as the store takes them\n'
            f"series = [{series}]\n"
        )


def plan_households(root: Path, honest: int = 2) -> list[Household]:
    """`honest` households that train, one that strikes against the job's buyer, the free rider, and one that
    pauses before the job; disjoint random shares of PLAID's 537 training recordings (the free rider's:
    RIDER_RECORDINGS of RIDER_CLASS)."""
    labels = np.asarray([s.label for s in load_plaid_series("train")[0].series], dtype=np.int64)
    rng = np.random.default_rng(SHARE_SEED)
    rider_label = PLAID_CLASSES.index(RIDER_CLASS)
    rider = rng.choice(np.flatnonzero(labels == rider_label), RIDER_RECORDINGS, replace=False)
    rest = rng.permutation(np.setdiff1d(np.arange(len(labels)), rider))
    # The honest households hold most recordings; the two that sit the job out hold fewer, so that the job trains
    # on most of PLAID (the central baseline trains on what the job's devices held, whatever that is).
    weights = np.array([3.0] * honest + [1.0, 1.0])
    cuts = np.cumsum(weights / weights.sum() * len(rest)).round().astype(int)[:-1]
    shares = np.split(rest, cuts)
    roles = [Role.HOUSEHOLD] * honest + [Role.STRIKES, Role.FREE_RIDER, Role.PAUSES]
    picked = [*shares[:honest], shares[honest], rider, shares[honest + 1]]
    households = []
    for i, (role, chosen) in enumerate(zip(roles, picked, strict=True)):
        member = f"household-{i + 1}"
        counts = np.bincount(labels[chosen], minlength=len(PLAID_CLASSES))
        classes = tuple(PLAID_CLASSES[c] for c in np.argsort(-counts, kind="stable") if counts[c])
        households.append(Household(member, role, tuple(sorted(int(s) for s in chosen)), classes, root / member))
    return households
