"""Flower acceleration, the coordinator's side: the pieces that make a round take seconds rather than tens of
seconds by working around Flower 1.42 internals, each wrapped from outside (Flower is neither patched nor copied).

- `reply_poll.ReplyPollGrid`: replies pulled every 0.1 s (`HttpGrid.send_and_receive` sleeps 3 s between pulls);
- `packed_arrays.PackedArraysGrid`: a message's model arrays as one Array (one HTTP request per Array object and
  chunk);
- `object_pull.prompt_object_pulls`: a reply object still being pushed asked for every 25 ms
  (`HttpGrid._runtime_client.PullObject`, Flower's 1 s back-off);
- `pull_hold.PullHold`, in the fleet front: a device's empty pull, and its early object pull, held until there is
  something to answer (the SuperNode's 3 s sleep after an empty pull, its back-off).

One switch turns them all off: `[federation] flower_acceleration` (default true). `serve` then runs the fleet front
without a hold, and `job start` puts `flower-acceleration = false` into the run config, so the ServerApp runs on
Flower's own grid. docs/federated.md ("Flower acceleration") lists what each piece relies on and what a Flower
upgrade needs; the device's side is edge.federated.acceleration.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.serverapp import Grid

from coordinator.federation.acceleration.object_pull import PromptObjectPull, prompt_object_pulls
from coordinator.federation.acceleration.packed_arrays import PackedArraysGrid
from coordinator.federation.acceleration.reply_poll import ReplyPollGrid


@dataclass(frozen=True)
class GridAcceleration:
    """The ServerApp's grid with every coordinator-side acceleration, and what they saw.

    grid: what the strategy runs on: replies polled every 0.1 s, around arrays packed, around Flower's grid.
    object_pull: the prompt object pulls installed on Flower's HTTP grid (None on any other grid).
    """

    grid: ReplyPollGrid
    object_pull: PromptObjectPull | None

    @classmethod
    def around(cls, grid: Grid) -> GridAcceleration:
        """Wrap Flower's `grid` (connecting it, when it is the HTTP grid: its runtime client is wrapped)."""
        return cls(ReplyPollGrid(PackedArraysGrid(grid)), prompt_object_pulls(grid))
