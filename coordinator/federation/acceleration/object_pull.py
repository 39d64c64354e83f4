"""Reply objects asked for again every 25 ms while their sender is still pushing them, not after Flower's back-off.

The SuperLink hands the grid a reply as soon as its metadata arrives, while the SuperNode is still pushing the
reply's objects; Flower's object pull then backs off 1 s, doubling (`flwr.supercore.constant.PULL_INITIAL_BACKOFF`),
before asking again. With a 0.1 s reply poll (reply_poll.py) nearly every round's last reply is pulled inside that
push window, so the back-off added about 1 s to the ServerApp's turnaround (docs/federated.md, "Performance").
`prompt_object_pulls` wraps the `PullObject` method of the runtime client behind Flower's HTTP grid
(`HttpGrid._runtime_client`, which `HttpGrid.pull_messages` looks up at each pull) so that an object reported
"not yet available" is asked for again every 25 ms for up to 2 s before Flower's own back-off sees it. That is one
method of one client instance, wrapped from outside; Flower's code is unchanged, and
tests/test_fl_grid_acceleration.py pins the internals it relies on (flwr 1.42).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.serverapp import Grid
from flwr.superlink.grid.http_grid import HttpGrid

PullObjectCall = Callable[[PullObjectRequest], PullObjectResponse]


class PromptObjectPull:
    """A `PullObject` call that asks again every `interval` s, for up to `patience` s, while the object exists but
    its content has not arrived yet; then it returns what the SuperLink last said (Flower's back-off takes over).

    Parameters
    ----------
    call: the runtime client's own `PullObject`.
    interval, patience: seconds between asks and the most to spend asking (defaults 0.025 and 2.0).
    """

    def __init__(self, call: PullObjectCall, interval: float = 0.025, patience: float = 2.0) -> None:
        self.call = call
        self.interval = interval
        self.patience = patience
        self.waited = 0  # objects that were not there at the first ask (a reply pulled while it was being pushed)

    def __call__(self, request: PullObjectRequest) -> PullObjectResponse:
        response = self.call(request)
        if not response.object_found or response.object_available:
            return response
        self.waited += 1
        deadline = time.monotonic() + self.patience
        while time.monotonic() < deadline:
            time.sleep(self.interval)
            response = self.call(request)
            if not response.object_found or response.object_available:
                break
        return response


def prompt_object_pulls(grid: Grid) -> PromptObjectPull | None:
    """Wrap the `PullObject` of Flower's HTTP grid's runtime client (see the module's docstring); None, and nothing
    changed, for any other grid (the simulation's in-memory grid has no object pulls to wait for)."""
    if not isinstance(grid, HttpGrid):
        return None
    client = grid._runtime_client  # connects, as the grid's first call would
    if isinstance(client.PullObject, PromptObjectPull):
        return client.PullObject
    prompt = PromptObjectPull(client.PullObject)
    client.PullObject = prompt  # type: ignore[method-assign]
    return prompt
