"""The ServerApp's grid wrapper (coordinator.federation.polling_grid): prompt object pulls through Flower's own HTTP
runtime client against a real HTTP server, and a pin on the Flower grid internals the wrapper relies on."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import flwr
import pytest
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
from flwr.proto.node_pb2 import Node
from flwr.superlink.grid.http_grid import HttpGrid

from coordinator.federation.polling_grid import PollingGrid, PromptObjectPull, prompt_object_pulls

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
    assert PollingGrid(grid, prompt_pulls=True).prompt_pulls is first
    assert prompt_object_pulls(PollingGrid(grid)) is None  # any other Grid is left as it is
    untouched = _grid(object_server)
    PollingGrid(untouched, prompt_pulls=False)
    assert not isinstance(untouched._runtime_client.PullObject, PromptObjectPull)


def test_the_flower_grid_internals_the_wrapper_relies_on_are_still_there() -> None:
    """`prompt_object_pulls` replaces `PullObject` on the client behind `HttpGrid._runtime_client`, which
    `HttpGrid.pull_messages` looks up at each pull. If a Flower upgrade moves either, this fails (pyproject pins
    flwr==1.42.*), rather than rounds silently paying the 1 s back-off again."""
    assert flwr.__version__.startswith("1.42."), flwr.__version__
    assert isinstance(inspect.getattr_static(HttpGrid, "_runtime_client"), property)
    assert "pull_object_protobuf=self._runtime_client.PullObject" in inspect.getsource(HttpGrid.pull_messages)
