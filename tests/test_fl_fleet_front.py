"""The fleet front (coordinator.federation.fleet_front): the devices' only way to the SuperLink, and its hold
(coordinator.federation.acceleration.pull_hold, Flower acceleration).

Against a real TLS SuperLink: only Fleet API requests pass, the rest are refused with a reason and counted; a
SuperLink that is gone is a 502, not a dead front. The rules that decide how often a held pull asks again are
checked on the hold itself. That held pulls carry real jobs is shown by tests/test_fl_deployment.py, whose
devices connect through a front as they do under `serve`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from flower_fixtures import Federation, free_port, issue_superlink_tls, plaid_windows
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.message_pb2 import PullObjectResponse

from coordinator.federation.acceleration.pull_hold import (
    HoldPolicy,
    PullHold,
    has_messages,
    node_id,
    object_not_yet_pushed,
)
from coordinator.federation.fleet_front import FleetFront, FleetFrontProcess, upstream_ssl_context
from coordinator.federation.superlink_process import SuperLinkProcess
from protocol.tasks.windows import WindowSet


def test_a_pull_response_with_a_message_is_told_from_an_empty_one() -> None:
    empty = PullMessagesResponse().SerializeToString()
    one = PullMessagesResponse(messages_list=[ProtoMessage()]).SerializeToString()
    assert not has_messages(empty)
    assert has_messages(one)
    assert has_messages(b"\xff\xff not protobuf")  # unreadable: passed on at once, never held


def test_an_object_the_sender_is_still_pushing_is_told_from_one_that_is_there_or_unknown() -> None:
    assert object_not_yet_pushed(PullObjectResponse(object_found=True, object_available=False).SerializeToString())
    there = PullObjectResponse(object_found=True, object_available=True, object_content=b"\0" * 1000)
    assert not object_not_yet_pushed(there.SerializeToString())
    assert not object_not_yet_pushed(PullObjectResponse(object_found=False).SerializeToString())  # Flower's error
    assert not object_not_yet_pushed(b"\xff\xff")  # unreadable: passed on as is


def test_the_node_a_pull_or_push_is_for_is_read_from_its_body() -> None:
    pull = PullMessagesRequest()
    pull.node.node_id = 4711
    push = PushMessagesRequest()
    push.node.node_id = 99
    assert node_id(PullMessagesRequest, pull.SerializeToString()) == 4711
    assert node_id(PushMessagesRequest, push.SerializeToString()) == 99
    assert node_id(PullMessagesRequest, b"\xff\xff") is None


def test_held_pulls_ask_fast_only_after_the_last_working_node_pushed_and_share_one_rate() -> None:
    policy = HoldPolicy(hold_s=5.0, poll_s=0.02, hot_s=1.0, idle_poll_s=0.5, idle_rate=20.0, work_s=600.0)
    hold = PullHold(policy)
    # Nobody has replied yet (a job starting, or devices idle): the slow poll.
    assert hold._poll_interval() == 0.5
    # Two nodes work on a round; one of them replies: still slow, the other's reply is what the round waits for.
    now = time.monotonic()
    hold._working.update({1: now, 2: now})
    hold._replied(1)
    assert hold._poll_interval() == 0.5
    # The last working node replies: the next round's messages are coming, so the held pulls ask fast; five held
    # pulls each ask five times less often, so the SuperLink sees one pull per poll_s in sum.
    hold._replied(2)
    hold._held = 5
    assert hold._poll_interval() == pytest.approx(0.1)
    # 40 held pulls while slow: together at most idle_rate a second.
    hold._working[3] = time.monotonic()
    hold._held = 40
    assert hold._poll_interval() == pytest.approx(2.0)
    # A node that took the round's message and never replied (it died) stops counting as working after work_s.
    hold._working[3] = time.monotonic() - policy.work_s - 1
    hold._all_replied_at = time.monotonic()
    assert hold._poll_interval() == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("path", "upstream_answer"),
    [
        ("/v1/fleet/pull-messages", PullMessagesResponse()),
        ("/v1/fleet/pull-object", PullObjectResponse(object_found=True, object_available=False)),
    ],
)
def test_without_a_hold_an_empty_answer_goes_back_at_once_and_nothing_is_counted_as_held(
    path: str, upstream_answer: PullMessagesResponse | PullObjectResponse
) -> None:
    asked: list[str] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, content=upstream_answer.SerializeToString())

    async def pull() -> httpx.Response:
        front._client = httpx.AsyncClient(transport=httpx.MockTransport(superlink), base_url=front.upstream)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front") as client:
            return await client.post(path, content=PullMessagesRequest().SerializeToString())

    front = FleetFront("https://127.0.0.1:1", ssl.create_default_context())  # Flower acceleration off
    answer = asyncio.run(pull())
    assert answer.status_code == 200 and answer.content == upstream_answer.SerializeToString()
    assert asked == [path]
    assert front.stats() == {"forwarded": 1}


def test_with_a_hold_an_empty_pull_is_asked_again_and_answered_when_its_message_is_there() -> None:
    message = PullMessagesResponse(messages_list=[ProtoMessage()]).SerializeToString()
    answers = [PullMessagesResponse().SerializeToString()] * 3 + [message]
    asked: list[bytes] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        asked.append(request.content)
        return httpx.Response(200, content=answers[min(len(asked), len(answers)) - 1])

    async def pull() -> httpx.Response:
        front._client = httpx.AsyncClient(transport=httpx.MockTransport(superlink), base_url=front.upstream)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=front), base_url="http://front") as client:
            return await client.post("/v1/fleet/pull-messages", content=request.SerializeToString())

    request = PullMessagesRequest()
    request.node.node_id = 4711
    hold = PullHold(HoldPolicy(hold_s=30.0, idle_poll_s=0.01, idle_rate=1000.0))
    front = FleetFront("https://127.0.0.1:1", ssl.create_default_context(), hold)
    answer = asyncio.run(pull())
    assert answer.status_code == 200 and answer.content == message
    assert asked == [request.SerializeToString()] * 4  # the SuperNode's own request, asked again unchanged
    assert front.stats() == {"forwarded": 1, "pulls_held": 1, "held_requests": 3, "held_pulls_answered": 1}


@pytest.fixture
def link_and_front(tmp_path: Path) -> Iterator[tuple[SuperLinkProcess, FleetFrontProcess]]:
    tls = issue_superlink_tls(tmp_path / "ca", "test-mid")
    link = SuperLinkProcess(flwr_home=tmp_path / "superlink", tls=tls, port=free_port(), log_path=tmp_path / "sl.log")
    front = FleetFrontProcess.beside(
        link,
        "127.0.0.1",
        free_port(),
        tmp_path / "front.log",
        hold_s=1.0,
        stats_path=tmp_path / "front.json",
        max_body_mb=1.0,
    )
    try:
        link.start()
        front.start()
        yield link, front
    except BaseException:
        for log in (tmp_path / "sl.log", tmp_path / "front.log"):
            if log.exists():
                print(f"---- {log.name} ----\n{log.read_text(errors='replace')[-4000:]}")
        raise
    finally:
        front.stop()
        link.stop()


@pytest.mark.slow
def test_only_the_fleet_api_passes_and_a_missing_superlink_is_a_502(
    link_and_front: tuple[SuperLinkProcess, FleetFrontProcess],
) -> None:
    link, front = link_and_front
    with httpx.Client(base_url=f"https://{front.address}", verify=upstream_ssl_context(link.tls.ca_cert)) as client:
        # The Control API (what starts and stops runs) is on the SuperLink's port, not on the devices'.
        control = client.post("/v1/control/list-runs", content=b"")
        assert control.status_code == 404 and control.json() == {"error": "not_fleet_api"}
        assert client.get("/v1/fleet/pull-messages").status_code == 404  # the Fleet API is POST only

        # A Fleet request reaches the SuperLink, whose answer comes back unchanged: without a node's signature it
        # is refused there (and, not being a 200, it is not held).
        unsigned = client.post(
            "/v1/fleet/pull-messages",
            content=PullMessagesRequest().SerializeToString(),
            headers={"content-type": "application/protobuf"},
        )
        direct = httpx.post(
            f"https://{link.address}/v1/fleet/pull-messages",
            content=PullMessagesRequest().SerializeToString(),
            headers={"content-type": "application/protobuf"},
            verify=upstream_ssl_context(link.tls.ca_cert),
        )
        assert unsigned.status_code == direct.status_code and 400 <= unsigned.status_code < 500
        assert unsigned.content == direct.content

        oversized = client.post("/v1/fleet/push-object", content=b"\0" * (2 * 2**20))
        assert oversized.status_code == 413 and oversized.json() == {"error": "body_too_large"}

        link.stop()
        gone = client.post("/v1/fleet/pull-messages", content=PullMessagesRequest().SerializeToString())
        assert gone.status_code == 502 and gone.json() == {"error": "superlink_unreachable"}
        # The front is still there and answers the next request the same way.
        assert client.post("/v1/fleet/pull-messages", content=b"").status_code == 502

    front.stop()
    # A graceful stop (uvicorn re-raises the SIGTERM it handled, so the exit code is -15): the counters were saved.
    assert "fleet front stopping" in front.log_path.read_text()
    stats = front.stats()
    assert stats["refused_not_fleet"] == 2
    assert stats["refused_too_large"] == 1
    assert stats["upstream_error"] == 2
    assert stats["forwarded"] == 1 and "pulls_held" not in stats


@pytest.mark.slow
def test_an_idle_supernodes_pulls_are_held_asked_again_with_its_signature_and_answered_empty(tmp_path: Path) -> None:
    fed = Federation(tmp_path, front_hold_s=1.0)
    try:
        fed.start()
        assert fed.front is not None
        train = plaid_windows("train")
        fed.add_device("dev0", WindowSet(train.x[:8], train.y[:8] if train.y is not None else None, "fp")).start()
        front = fed.front
        # No run: every pull finds nothing. The front asks again with the SuperNode's own signed request (the
        # SuperLink accepts it: no refusals) and answers it empty when the hold runs out.
        deadline = time.monotonic() + 60
        while front.stats().get("held_pulls_empty", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = front.stats()
        assert stats.get("held_pulls_empty", 0) >= 2, stats
        assert stats["held_requests"] >= stats["held_pulls_empty"]
        assert "held_pulls_refused" not in stats and "upstream_error" not in stats
        assert "held_pulls_answered" not in stats
        assert fed.devices[0].supernode.proc is not None and fed.devices[0].supernode.proc.poll() is None
    except BaseException:
        fed.print_logs()
        raise
    finally:
        fed.stop()
