"""Small files replaced atomically and durably: a reader sees the old content or the new, never a torn write, and the
new content survives a power cut once the call returns (a Pi hub loses power without warning)."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.private_files import private_dir


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `.{name}.{pid}.tmp` beside `path` (0600; missing folders 0700), fsync it, rename it over
    `path`, fsync the folder.

    The temporary name starts with `.` and ends in `.tmp`, so folder scans that take `*.json` never see it.
    """
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself must survive a power cut before anyone acts on the file
    finally:
        os.close(dir_fd)
