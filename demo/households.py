"""Three simulated households and one free rider, each replaying its own slice of the real PLAID recordings.

Each household's device plays its recordings through the replay driver into its own SampleStore file, then cuts
the task's windows from the store exactly as the agent does before a round (edge.sensors.export), so the windows,
labels and dataset fingerprint come from the same code a real device runs. The buyer's validation data is PLAID's
test split, which no household holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edge.sensors.export import task_window_set, window_spec_for
from edge.sensors.plaid import PLAID_CLASSES, LabelledWindows, load_plaid
from edge.sensors.replay import plaid_replay
from edge.sensors.store import SampleStore, write_all
from edge.sensors.windows import Windows
from protocol.tasks.spec import PLAID_APPLIANCE
from protocol.tasks.windows import WindowSet

SENSOR = "plaid"
# Recordings per household (disjoint slices of PLAID's 537 training recordings); the free rider holds a few too,
# but never trains on them.
HONEST_SLICE = 150
RIDER_SLICE = 30
REPLAY_START_MS = 1_764_000_000_000


@dataclass(frozen=True)
class Household:
    name: str
    free_rider: bool
    store_path: Path
    samples: int
    windows: Windows
    window_set: WindowSet

    @property
    def fingerprint_hex(self) -> str:
        return self.windows.fingerprint().hex()


def slices(names: list[str], riders: set[str], seed: int) -> dict[str, list[int]]:
    """Disjoint random slices of the training recordings: whose recordings each household replays."""
    order = np.random.default_rng(seed).permutation(537).tolist()
    out: dict[str, list[int]] = {}
    at = 0
    for name in names:
        size = RIDER_SLICE if name in riders else HONEST_SLICE
        out[name] = sorted(order[at : at + size])
        at += size
    return out


def replay_household(name: str, series: list[int], store_path: Path, free_rider: bool) -> Household:
    sensor = plaid_replay(SENSOR, split="train", series=series, loop=False)
    with SampleStore(store_path) as store:
        store.register(sensor.name, sensor.channels, sensor.class_names, sensor.source)
        written = write_all(store, sensor.samples(REPLAY_START_MS))
        windows = store.windows(window_spec_for(PLAID_APPLIANCE, SENSOR))
    return Household(name, free_rider, store_path, written, windows, task_window_set(PLAID_APPLIANCE, windows))


def build_households(workdir: Path, names: list[str], riders: set[str], console: Console) -> list[Household]:
    stores = workdir / "households"
    stores.mkdir(exist_ok=True)
    households = [
        replay_household(name, series, stores / f"{name}.db", name in riders)
        for name, series in slices(names, riders, seed=0).items()
    ]
    table = Table("household", "samples replayed", "windows", "appliances (windows per class)", "dataset fingerprint")
    for h in households:
        counts = np.bincount(h.windows.y, minlength=len(PLAID_CLASSES))
        mix = ", ".join(f"{PLAID_CLASSES[i]} {c}" for i, c in enumerate(counts) if c)
        label = f"{h.name} (free rider)" if h.free_rider else h.name
        table.add_row(label, f"{h.samples:,}", str(len(h.windows)), mix, h.fingerprint_hex[:16] + "...")
    console.print(table)
    return households


def buyer_validation() -> LabelledWindows:
    """PLAID's test split: the buyer's held-out validation data (no household has these recordings)."""
    return load_plaid("test", length=PLAID_APPLIANCE.window_length)
