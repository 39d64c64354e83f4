"""A cgroup v1 memory group that holds a device's processes under the systemd unit's memory bound, for the tests and
bench/device_memory_bench.py.

The Pi runs the agent under `MemoryMax=` of deploy/raspberrypi/midgate-agent.service; systemd enforces it with the
memory controller. This machine has no systemd as PID 1 and its cgroup2 hierarchy has no memory controller, but the
cgroup v1 one is writable as root: a group gets the limit (and the same memory+swap limit, so nothing escapes to swap,
as `MemorySwapMax=0` says), the agent starts inside it (`joined`) as systemd starts it inside its unit's, and everything
it starts inherits the group. What the group counts is anonymous memory plus the page cache its processes bring in
first: a shared library another process on this machine already read is charged to that process's group, not to ours,
where on a Pi the agent is the first reader of torch's libraries."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mqtt_fixtures import REPO

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
UNIT_FILE = REPO / "deploy" / "raspberrypi" / "midgate-agent.service"
_SIZE = re.compile(r"^(\d+)([KMGT]?)$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def unit_memory_bytes(key: str, unit: Path = UNIT_FILE) -> int:
    """`key=` (MemoryMax, MemoryHigh) of the unit file in bytes, as systemd reads it (base 1024 suffixes)."""
    for line in unit.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            found = _SIZE.match(value.strip())
            if found is None:
                raise ValueError(f"{unit}: {key}={value!r} is not a byte size")
            return int(found.group(1)) * _UNITS[found.group(2)]
    raise ValueError(f"{unit} sets no {key}=")


def _memory_cgroup_of(pid: int) -> Path:
    """The memory group `pid` is in (/proc/PID/cgroup's "N:memory:/path" line)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return MEMORY_ROOT / path.lstrip("/")
    return MEMORY_ROOT


def unwritable_reason() -> str | None:
    """Why a memory group cannot be made here, or None when it can."""
    if not (MEMORY_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {MEMORY_ROOT}"
    if not os.access(MEMORY_ROOT, os.W_OK):
        return f"{MEMORY_ROOT} is not writable (the memory cgroup needs root)"
    return None


@dataclass
class MemoryGroup:
    """One memory cgroup: `add` moves a process in (its later children follow); read its peak and its failures."""

    path: Path

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def _write(self, name: str, value: object) -> None:
        (self.path / name).write_text(str(value))

    def limit(self, limit_bytes: int) -> None:
        """Memory, and memory plus swap when the kernel accounts swap, both at `limit_bytes`: no swap."""
        self._write("memory.limit_in_bytes", limit_bytes)
        if (self.path / "memory.memsw.limit_in_bytes").exists():
            self._write("memory.memsw.limit_in_bytes", limit_bytes)

    def add(self, pid: int) -> None:
        """Moves `pid` in. Only its later charges count: the kernel (6.x) no longer moves what it already holds."""
        self._write("cgroup.procs", pid)

    @contextlib.contextmanager
    def joined(self) -> Iterator[None]:
        """This process inside the group for the block, so that what it starts there begins in the group with every
        page it will ever touch charged to it; then back where it was."""
        home = _memory_cgroup_of(os.getpid())
        self.add(os.getpid())
        try:
            yield
        finally:
            (home / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        return [int(line) for line in self._read("cgroup.procs").split()]

    @property
    def max_usage_bytes(self) -> int:
        return int(self._read("memory.max_usage_in_bytes"))

    @property
    def failcnt(self) -> int:
        """How often an allocation hit the limit (the kernel then reclaimed; not itself a failure)."""
        return int(self._read("memory.failcnt"))

    @property
    def oom_kills(self) -> int:
        """Processes of the group the OOM killer ended (memory.oom_control's oom_kill, on kernels that count it)."""
        for line in self._read("memory.oom_control").splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
        return 0

    def close(self, timeout_s: float = 10.0) -> None:
        """SIGKILL what is still inside (its owner stopped what it started; this is the net below), wait until the
        group is empty (a killed process stays in it until it has exited), then remove it."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            self.path.rmdir()
        except OSError as exc:  # said, not raised: an exception here would hide the test's own failure
            print(f"memory group {self.path} left behind: {exc}; remove it with rmdir")


@contextlib.contextmanager
def memory_group(name: str, limit_bytes: int) -> Iterator[MemoryGroup]:
    """A fresh group `name` under MEMORY_ROOT limited to `limit_bytes`, removed on exit."""
    group = MemoryGroup(MEMORY_ROOT / name)
    group.path.mkdir()
    try:
        group.limit(limit_bytes)
        yield group
    finally:
        group.close()
