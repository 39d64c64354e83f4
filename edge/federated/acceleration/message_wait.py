"""A forked ClientApp waits until the SuperNode's log shows the message it is about to ask for pulled.

The SuperNode creates a message's task before it pulls the message's objects from the SuperLink, so the SuperExec
can start a ClientApp that asks for objects the SuperNode does not hold yet; Flower's object pull then backs off
1 s, doubling (`flwr.supercore.constant.PULL_INITIAL_BACKOFF`), which measured 1.3-2 s of every round on a loaded
machine. The SuperNode handles one message at a time and logs a line before and after each pull
(`flwr/supernode/start_client_internal.py`, flwr 1.42: "Receiving: ...", then "Received successfully" or "Failed to
receive message"); under midgate's SuperNodeProcess that log is the ClientApp's own standard output. So the warm
executor's ClientApp child waits until the last "Receiving" line has an outcome after it (at most 15 s).
"""

from __future__ import annotations

import os
import stat
import time

RECEIVING_LINE = b"Receiving: "
RECEIVED_LINES = (b"Received successfully", b"Failed to receive message")
MESSAGE_WAIT_S = 15.0
MESSAGE_POLL_S = 0.01
LOG_TAIL_BYTES = 256 * 1024


def message_pulled(log_tail: bytes) -> bool | None:
    """Whether the SuperNode finished pulling the message it received last, judged from the tail of its log: True
    (pulled, or failed: either way there is nothing to wait for), False (still pulling), None (no message seen)."""
    start = log_tail.rfind(RECEIVING_LINE)
    if start < 0:
        return None
    after = log_tail[start:]
    return any(line in after for line in RECEIVED_LINES)


def wait_for_message(log_fd: int, timeout: float = MESSAGE_WAIT_S, poll: float = MESSAGE_POLL_S) -> float:
    """Block until `message_pulled` holds for the log open on `log_fd`, at most `timeout` seconds; returns the
    seconds waited. Returns at once when the descriptor is not a regular file (no log to read) or shows no message.

    Parameters
    ----------
    log_fd: the SuperNode's log, which is the ClientApp's standard output under midgate's SuperNodeProcess.
    timeout: upper bound; afterwards the ClientApp starts anyway and Flower's own retry takes over.
    poll: seconds between reads of the log's tail.
    """
    started = time.monotonic()
    try:
        if not stat.S_ISREG(os.fstat(log_fd).st_mode):
            return 0.0
        # The log is open write-only (append); reading needs a descriptor of its own (Linux: through /proc).
        reader = os.open(f"/proc/self/fd/{log_fd}", os.O_RDONLY)
    except OSError:
        return 0.0
    try:
        while time.monotonic() - started < timeout:
            size = os.fstat(reader).st_size
            offset = max(0, size - LOG_TAIL_BYTES)
            if message_pulled(os.pread(reader, size - offset, offset)) is not False:
                break
            time.sleep(poll)
    except OSError:
        pass
    finally:
        os.close(reader)
    return time.monotonic() - started
