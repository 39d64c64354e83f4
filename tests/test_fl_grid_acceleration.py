"""The ServerApp's grid accelerations (coordinator.federation.acceleration), each alone: the 0.1 s reply poll and
packed arrays around a grid that stands in for Flower's, prompt object pulls through Flower's own HTTP runtime client
against a real HTTP server (tests/test_flower_internals.py pins the Flower internals they rely on)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.proto.node_pb2 import Node
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid

from coordinator.federation.acceleration import GridAcceleration
from coordinator.federation.acceleration.object_pull import PromptObjectPull, prompt_object_pulls
from coordinator.federation.acceleration.packed_arrays import PackedArraysGrid
from coordinator.federation.acceleration.reply_poll import ReplyPollGrid
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.packed import PACKED_KEY, content_is_packed, pack_content

PATH = "/v1/runtime/pull-object"


class _ObjectServer(ThreadingHTTPServer):
    """Serves PullObject: object id -> how many asks answer "not available yet" before the content is there;
    ids it does not know answer "not found"."""

    def __init__(self, pending: dict[str, int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pending = dict(pending)
        self.asks: dict[str, int] = {}


class _Handler(BaseHTTPRequestHandler):
    server: _ObjectServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        assert self.path == PATH
        request = PullObjectRequest.FromString(body)
        oid = request.object_id
        self.server.asks[oid] = self.server.asks.get(oid, 0) + 1
        if oid not in self.server.pending:
            response = PullObjectResponse(object_found=False, object_available=False)
        elif self.server.asks[oid] <= self.server.pending[oid]:
            response = PullObjectResponse(object_found=True, object_available=False)
        else:
            response = PullObjectResponse(object_found=True, object_available=True, object_content=oid.encode())
        payload = response.SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def object_server() -> Iterator[_ObjectServer]:
    server = _ObjectServer({"late": 3, "never": 10_000, "ready": 0})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _grid(server: _ObjectServer) -> HttpGrid:
    return HttpGrid(f"127.0.0.1:{server.server_address[1]}", insecure=True, token="test-token")


def _ask(grid: HttpGrid, object_id: str) -> PullObjectResponse:
    request = PullObjectRequest(node=Node(node_id=0), run_id=1, object_id=object_id)
    return grid._runtime_client.PullObject(request)


def test_an_object_still_being_pushed_is_asked_for_again_until_it_is_there(object_server: _ObjectServer) -> None:
    grid = _grid(object_server)
    prompt = prompt_object_pulls(grid)
    assert prompt is not None
    response = _ask(grid, "late")
    assert response.object_available and response.object_content == b"late"
    assert object_server.asks["late"] == 4  # 3 "not yet" answers, then the content, all inside one PullObject call
    assert prompt.waited == 1
    assert _ask(grid, "ready").object_content == b"ready"
    assert object_server.asks["ready"] == 1 and prompt.waited == 1


def test_an_unknown_object_is_answered_at_once_and_a_stuck_one_after_the_patience(
    object_server: _ObjectServer,
) -> None:
    grid = _grid(object_server)
    prompt = prompt_object_pulls(grid)
    assert prompt is not None
    response = _ask(grid, "missing")
    assert not response.object_found and object_server.asks["missing"] == 1  # Flower raises ObjectPullError on this
    prompt.patience = 0.2
    response = _ask(grid, "never")
    # Still not there: Flower's back-off (and its own time limit) decide what happens next, as without the wrapper.
    assert response.object_found and not response.object_available
    assert object_server.asks["never"] > 1


def test_only_flowers_http_grid_is_wrapped_and_only_once(object_server: _ObjectServer) -> None:
    grid = _grid(object_server)
    first = prompt_object_pulls(grid)
    assert isinstance(first, PromptObjectPull)
    assert prompt_object_pulls(grid) is first  # not wrapped twice
    assert GridAcceleration.around(grid).object_pull is first
    assert prompt_object_pulls(ReplyPollGrid(grid)) is None  # any other Grid is left as it is
    untouched = _grid(object_server)
    assert not isinstance(untouched._runtime_client.PullObject, PromptObjectPull)  # acceleration off: nothing wraps


class _Inner(Grid):
    """Stands in for Flower's grid: stamps message ids as Flower does, records what was pushed, and answers each
    message with its scheduled reply once it has been pulled for `after` times."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []
        self.replies: dict[str, tuple[Message, int]] = {}
        self.pulls = 0

    def answer(self, message: Message, content: RecordDict, after: int = 0) -> None:
        self.replies[message.metadata.message_id] = (Message(content=content, reply_to=message), after)

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [7]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            self.pushed.append(message)
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = set(message_ids)
        ready = [(mid, reply) for mid, (reply, after) in self.replies.items() if mid in wanted and self.pulls > after]
        for mid, _ in ready:
            del self.replies[mid]
        return [reply for _, reply in ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise AssertionError("the accelerations push and pull themselves")


def _train(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=7, message_type="train", group_id="1")


MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, dtype=np.float32)}


def _model() -> RecordDict:
    return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in MODEL.items()}), "config": ConfigRecord({})})


@pytest.mark.usefixtures("in_a_task")
def test_replies_are_pulled_every_poll_interval_until_all_are_in() -> None:
    inner = _Inner()
    grid = ReplyPollGrid(inner, poll_interval=0.01)
    first, second = _train(_model()), _train(RecordDict({"config": ConfigRecord({"n": 2})}))
    for message in (first, second):  # the ids Flower's grid will stamp, so that replies can be scheduled
        message.metadata.__dict__["_message_id"] = message.object_id
    inner.answer(first, RecordDict({"config": ConfigRecord({"r": 1})}))
    inner.answer(second, RecordDict({"config": ConfigRecord({"r": 2})}), after=3)
    replies = list(grid.send_and_receive([first, second], timeout=10))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted([first.object_id, second.object_id])
    assert inner.pulls == 4  # one pull per poll interval, none after the last reply


@pytest.mark.usefixtures("in_a_task")
def test_a_reply_that_never_comes_ends_the_exchange_at_the_timeout_and_no_push_is_no_exchange() -> None:
    inner = _Inner()
    grid = ReplyPollGrid(inner, poll_interval=0.01)
    assert list(grid.send_and_receive([_train(_model())], timeout=0.1)) == []
    pulls = inner.pulls
    assert pulls > 1
    assert list(grid.send_and_receive([], timeout=0.1)) == []
    assert inner.pulls == pulls  # nothing pushed: nothing to pull


@pytest.mark.usefixtures("in_a_task")
def test_model_arrays_leave_packed_and_packed_replies_arrive_unpacked() -> None:
    inner = _Inner()
    grid = PackedArraysGrid(inner)
    message = _train(_model())
    (message_id,) = grid.push_messages([message])
    assert content_is_packed(inner.pushed[0].content)
    assert list(inner.pushed[0].content.array_records["arrays"].keys()) == [PACKED_KEY]
    update = {k: v + 1 for k, v in MODEL.items()}
    inner.answer(message, pack_content(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in update.items()})})))
    (reply,) = grid.pull_messages([message_id])
    got = {k: a.numpy() for k, a in reply.content.array_records["arrays"].items()}
    assert arrays_sha256(got) == arrays_sha256(update)
    assert grid.unpack_refused == 0


@pytest.mark.usefixtures("in_a_task")
def test_a_reply_that_does_not_unpack_is_passed_on_as_it_came_and_counted() -> None:
    inner = _Inner()
    grid = PackedArraysGrid(inner)
    message = _train(_model())
    (message_id,) = grid.push_messages([message])
    bad = RecordDict({"arrays": ArrayRecord({PACKED_KEY: Array(np.frombuffer(b"not packed", dtype=np.uint8))})})
    inner.answer(message, bad)
    (reply,) = grid.pull_messages([message_id])
    assert content_is_packed(reply.content)  # the strategy drops it as malformed_reply: not the global model's names
    assert grid.unpack_refused == 1
