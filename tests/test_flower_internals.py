"""The Flower 1.42 internals midgate's Flower acceleration relies on, one assertion each (docs/federated.md, "Flower
acceleration", names the piece behind each). pyproject pins flwr==1.42.*; a Flower upgrade that changes one of these
fails here, rather than rounds silently slowing down or a workaround quietly doing nothing. Then either adapt the
piece, or drop it: with `flower_acceleration = false` every job runs on Flower as shipped, and
tests/test_fl_roles_e2e.py shows the same outcome both ways."""

from __future__ import annotations

import importlib
import inspect

import flwr
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.supercore import constant
from flwr.supercore.superexec import run_superexec
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.superlink.routers.fleet import router as fleet_router
from flwr.supernode import start_client_internal

from coordinator.federation.acceleration.pull_hold import PULL_MESSAGES, PULL_OBJECT, PUSH_MESSAGES
from coordinator.federation.warm_serverapp import SERVERAPP_TABLE
from edge.federated.acceleration.device import SUPEREXEC_ENV
from edge.federated.acceleration.message_wait import RECEIVED_LINES, RECEIVING_LINE
from edge.federated.acceleration.warm_executor import ENTRY_POINTS


def test_the_pinned_flower_is_the_one_these_internals_were_read_from() -> None:
    assert flwr.__version__.startswith("1.42."), flwr.__version__


def test_the_servers_grid_sleeps_3_s_between_reply_pulls_and_pulls_objects_through_its_runtime_client() -> None:
    # ReplyPollGrid exists because of the sleep.
    assert "time.sleep(3)" in inspect.getsource(HttpGrid.send_and_receive)
    # prompt_object_pulls replaces PullObject on the client behind HttpGrid._runtime_client, which pull_messages
    # looks up at each pull; an object not there yet makes Flower back off 1 s, doubling.
    assert isinstance(inspect.getattr_static(HttpGrid, "_runtime_client"), property)
    assert "pull_object_protobuf=self._runtime_client.PullObject" in inspect.getsource(HttpGrid.pull_messages)
    assert constant.PULL_INITIAL_BACKOFF == 1
    assert {"object_found", "object_available"} <= set(PullObjectResponse.DESCRIPTOR.fields_by_name)


def test_the_supernode_sleeps_3_s_after_an_empty_pull_and_the_fleet_api_is_http_protobuf_on_fixed_paths() -> None:
    # PullHold answers a SuperNode's empty pull late so that this sleep does not fall between rounds.
    assert "time.sleep(3)" in inspect.getsource(start_client_internal)
    # The fleet front and its hold read these paths and bodies.
    assert fleet_router.router.prefix == "/v1/fleet"
    routes = {route.path for route in fleet_router.router.routes}  # type: ignore[attr-defined]
    assert {PULL_MESSAGES, PUSH_MESSAGES, PULL_OBJECT} <= routes
    assert "messages_list" in PullMessagesResponse.DESCRIPTOR.fields_by_name
    assert "node" in PullMessagesRequest.DESCRIPTOR.fields_by_name
    assert "node" in PushMessagesRequest.DESCRIPTOR.fields_by_name


def test_the_supernode_logs_each_pull_the_clientapp_waits_for() -> None:
    source = inspect.getsource(start_client_internal)
    assert RECEIVING_LINE.decode() in source
    assert all(line.decode() in source for line in RECEIVED_LINES)


def test_the_warm_executor_forks_flowers_own_entry_points_and_the_superexec_reads_its_poll_interval() -> None:
    for module, attribute in ENTRY_POINTS.values():
        assert callable(getattr(importlib.import_module(module), attribute))
    assert constant.TASK_TYPE_TO_COMMAND[constant.TaskType.CLIENT_APP] == "flwr-clientapp"  # looked up on PATH
    assert run_superexec._TASK_POLL_INTERVAL_ENV in SUPEREXEC_ENV
    assert run_superexec._DEFAULT_TASK_POLL_INTERVAL_SECONDS == 1.0


def test_the_warm_serverapp_forks_flowers_own_entry_point_under_the_name_the_superexec_starts() -> None:
    """serve's warm ServerApp (coordinator.federation.warm_serverapp): the SuperLink's SuperExec starts
    `flwr-serverapp` by bare name from PATH, where the fork server's launcher of that name comes first."""
    (name,) = SERVERAPP_TABLE.entry_points
    assert constant.TASK_TYPE_TO_COMMAND[constant.TaskType.SERVER_APP] == name == "flwr-serverapp"
    module, _, attribute = SERVERAPP_TABLE.entry_points[name].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
