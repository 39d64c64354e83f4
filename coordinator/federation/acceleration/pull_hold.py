"""The fleet front's hold: a SuperNode's empty pull, and its pull of an object still being pushed, are asked again
on its behalf until there is something to answer.

A SuperNode that pulls and finds no message sleeps a fixed 3 s before it pulls again
(`flwr/supernode/start_client_internal.py`, flwr 1.42); right after pushing a round's reply it always finds none,
because the next round's message waits for the other devices' replies. `PullHold` asks the SuperLink again with the
SuperNode's own request, signed headers included (Flower's signature covers only a timestamp that stays valid for
minutes), at the rate `HoldPolicy` sets, for up to `hold_s`, and answers as soon as a message is there, so the next
round starts when it is ready rather than after the SuperNode's sleep. A pull that stays empty is answered empty,
as the SuperLink would have answered it. Likewise an object the ServerApp is still pushing, which the SuperNode
would ask for again only after a 1 s, doubling back-off (`flwr.supercore.inflatable.pull_objects`), is asked for
every `object_poll_s` for up to `object_hold_s`. Flower's code is not changed: the SuperNode still sleeps whenever
its pull comes back empty. The requests are read as Flower's Fleet API protobufs (`flwr.proto.fleet_pb2`,
`flwr.proto.message_pb2`) on its HTTP paths (`/v1/fleet/...`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest
from flwr.proto.message_pb2 import PullObjectResponse
from google.protobuf.message import DecodeError

PULL_MESSAGES = "/v1/fleet/pull-messages"
PUSH_MESSAGES = "/v1/fleet/push-messages"
PULL_OBJECT = "/v1/fleet/pull-object"

AskAgain = Callable[[], Awaitable[httpx.Response]]
"""Sends the SuperNode's request to the SuperLink once more, unchanged."""


@dataclass(frozen=True)
class HoldPolicy:
    """How long an empty pull is held, and how often the SuperLink is asked again meanwhile.

    A round's next messages appear only after every device working on the round has pushed its reply. The hold
    sees that: a node works from the pull that brought it a message to its push. For `hot_s` after the last
    working node pushed, the held pulls together ask the SuperLink every `poll_s` (each of n held pulls every
    n x `poll_s`, staggered); otherwise each asks every `idle_poll_s`, and all of them together at most
    `idle_rate` times a second. When one held pull is answered with a message, every other held pull asks at once
    (a round's messages are sent together). So the SuperLink sees a bounded rate of extra pulls, however many
    devices wait. A node that has not replied `work_s` after its pull is taken for gone.
    """

    hold_s: float = 5.0
    poll_s: float = 0.02
    hot_s: float = 1.0
    idle_poll_s: float = 0.5
    idle_rate: float = 20.0
    work_s: float = 900.0
    object_poll_s: float = 0.025
    object_hold_s: float = 2.0


def object_not_yet_pushed(body: bytes) -> bool:
    """Whether a PullObject response says the object exists but its content has not arrived yet (the sender is
    still pushing it). Such an answer is a few bytes; one with content never is, and is not parsed."""
    if len(body) > 16:
        return False
    response = PullObjectResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return False
    return response.object_found and not response.object_available


def has_messages(body: bytes) -> bool:
    """Whether a PullMessages response body carries a message; an unreadable body counts as one (passed on as is)."""
    response = PullMessagesResponse()
    try:
        response.ParseFromString(body)
    except DecodeError:
        return True
    return len(response.messages_list) > 0


def node_id(request_type: type[PullMessagesRequest] | type[PushMessagesRequest], body: bytes) -> int | None:
    """The node a Fleet pull or push request is from, or None when the body does not parse."""
    request = request_type()
    try:
        request.ParseFromString(body)
    except DecodeError:
        return None
    return int(request.node.node_id)


@dataclass
class PullHold:
    """Decides what a SuperNode gets for a Fleet request the SuperLink answered 200; one per fleet front.

    Counters (`pulls_held`, `held_pulls_answered`, `held_pulls_empty`, `held_pulls_refused`, `object_pulls_held`,
    `object_pulls_still_missing`, `held_requests`) go to `counts`.
    """

    policy: HoldPolicy = field(default_factory=HoldPolicy)
    counts: Counter[str] = field(default_factory=Counter)
    _working: dict[int | None, float] = field(default_factory=dict)  # node id -> when its message was pulled
    _all_replied_at: float = 0.0
    _held: int = 0
    _news: asyncio.Event = field(default_factory=asyncio.Event)

    async def answer(self, path: str, body: bytes, response: httpx.Response, ask_again: AskAgain) -> httpx.Response:
        """The answer to the SuperNode's request `body` on `path`, whose first answer from the SuperLink was
        `response`; `ask_again` repeats the request."""
        if path == PUSH_MESSAGES:
            self._replied(node_id(PushMessagesRequest, body))
        if path == PULL_OBJECT and self.policy.object_hold_s > 0 and object_not_yet_pushed(response.content):
            return await self._hold_object_pull(response, ask_again)
        if path != PULL_MESSAGES:
            return response
        node = node_id(PullMessagesRequest, body)
        if has_messages(response.content):
            self._working[node] = time.monotonic()
            return response
        if self.policy.hold_s <= 0:
            return response
        return await self._hold_pull(node, response, ask_again)

    async def _hold_pull(self, node: int | None, response: httpx.Response, ask_again: AskAgain) -> httpx.Response:
        """An empty pull: ask again on the SuperNode's behalf until a message is there or the hold is over."""
        self.counts["pulls_held"] += 1
        self._held += 1
        try:
            deadline = time.monotonic() + self.policy.hold_s
            while (remaining := deadline - time.monotonic()) > 0:
                await self._wait_for_news(min(remaining, self._poll_interval() * random.uniform(0.5, 1.5)))
                response = await ask_again()
                self.counts["held_requests"] += 1
                if response.status_code != 200:
                    self.counts["held_pulls_refused"] += 1  # e.g. the run or the node ended: passed on as is
                    return response
                if has_messages(response.content):
                    self.counts["held_pulls_answered"] += 1
                    self._working[node] = time.monotonic()
                    self._news.set()  # the other held pulls ask now: their messages were sent with this one
                    self._news = asyncio.Event()
                    return response
            self.counts["held_pulls_empty"] += 1
            return response
        finally:
            self._held -= 1

    async def _hold_object_pull(self, response: httpx.Response, ask_again: AskAgain) -> httpx.Response:
        """A message's object asked for while the ServerApp is still pushing it: asked for every `object_poll_s`
        for up to `object_hold_s`."""
        self.counts["object_pulls_held"] += 1
        deadline = time.monotonic() + self.policy.object_hold_s
        while time.monotonic() < deadline:
            await asyncio.sleep(self.policy.object_poll_s)
            response = await ask_again()
            self.counts["held_requests"] += 1
            if response.status_code != 200 or not object_not_yet_pushed(response.content):
                return response
        self.counts["object_pulls_still_missing"] += 1
        return response

    def _replied(self, node: int | None) -> None:
        self._working.pop(node, None)
        if not self._still_working():
            self._all_replied_at = time.monotonic()

    def _still_working(self) -> bool:
        """Whether a node is working on a message; one that has not replied within `work_s` is taken for gone (it
        died, or its round was given up) and stops slowing the others' held pulls."""
        now = time.monotonic()
        for node, since in list(self._working.items()):
            if now - since > self.policy.work_s:
                del self._working[node]
        return bool(self._working)

    def _poll_interval(self) -> float:
        """One held pull's wait before it asks again; n held pulls ask n times as often as one, in sum."""
        held = max(1, self._held)
        if not self._still_working() and time.monotonic() - self._all_replied_at < self.policy.hot_s:
            return self.policy.poll_s * held
        return max(self.policy.idle_poll_s, held / self.policy.idle_rate)

    async def _wait_for_news(self, seconds: float) -> None:
        """Sleep `seconds`, or less if another held pull was just answered."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._news.wait(), seconds)
