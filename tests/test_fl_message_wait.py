"""A forked ClientApp's wait for its message (edge.federated.acceleration.message_wait): the SuperNode's log lines
say when the message it is about to ask for has been pulled."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from edge.federated.acceleration.message_wait import message_pulled, wait_for_message

RECEIVING = b"\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: ab12)\n"
RECEIVED = b"\x1b[92mINFO \x1b[0m:      Received successfully\n"
FAILED = b"\x1b[91mERROR \x1b[0m:     Failed to receive message ab12: timeout\n"
NOISE = b'INFO:     127.0.0.1:40840 - "POST /v1/runtime/acquire-task HTTP/1.1" 200 OK\n'


@pytest.mark.parametrize(
    ("tail", "pulled"),
    [
        (NOISE, None),  # no message yet: nothing to wait for
        (NOISE + RECEIVING + NOISE, False),  # the SuperNode is still pulling the message's objects
        (RECEIVING + NOISE + RECEIVED, True),
        (RECEIVING + FAILED, True),  # nothing will arrive; Flower's ClientApp reports the failure
        (RECEIVING + RECEIVED + NOISE + RECEIVING, False),  # the earlier message's outcome does not count
    ],
)
def test_message_pulled_reads_the_last_message_in_the_supernode_log(tail: bytes, pulled: bool | None) -> None:
    assert message_pulled(tail) is pulled


def test_clientapp_waits_until_the_supernode_log_shows_its_message_pulled(tmp_path: Path) -> None:
    log = tmp_path / "supernode.log"
    log.write_bytes(NOISE + RECEIVING)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)  # write-only, as the ClientApp's standard output is
    try:
        assert wait_for_message(fd, timeout=0.3) >= 0.3  # still pulling: it waits out its bound
        done = threading.Event()
        waited: list[float] = []
        waiter = threading.Thread(target=lambda: (waited.append(wait_for_message(fd, timeout=120)), done.set()))
        waiter.start()
        assert not done.wait(0.3)  # still waiting for the pull
        os.write(fd, NOISE + RECEIVED)
        waiter.join(120)
        assert done.is_set() and waited[0] < 120
    finally:
        os.close(fd)


def test_clientapp_does_not_wait_without_a_log_file() -> None:
    read_end, write_end = os.pipe()
    try:
        assert wait_for_message(write_end, timeout=30) == 0.0
    finally:
        os.close(read_end)
        os.close(write_end)
