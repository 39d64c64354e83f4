"""Folders and files only their owner may read: the data folders both roles create (0700) and their databases (0600).

The agent's folder holds the device key, broker password and the member's choices; the coordinator's the MID key,
the registry and every report. A Pi hub or a MID host may have other accounts, so neither relies on the umask. Both
sides create their folders and databases through these two functions; folders and files that already exist keep
their mode (it is the owner's choice), only what is created here gets these modes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FOLDER_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` and each of its missing parents 0700 (`Path.mkdir(parents=True)` would give the parents the
    umask's mode); returns `path`."""
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for created in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            created.mkdir(mode=FOLDER_MODE)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and 0600 (its folders 0700) unless it exists; returns `path`. Meant for SQLite files:
    SQLite takes an empty file for a new database and creates its -wal and -shm files with the database's mode."""
    private_dir(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return path
    os.close(fd)
    return path


__all__ = ["FILE_MODE", "FOLDER_MODE", "private_dir", "private_file"]
