"""Who owns each file the broker reads or writes, and how the files it rereads are replaced.

Mosquitto 2.0, started as root (Debian's `mosquitto.service`), drops to its `user` right after reading mosquitto.conf
and before it opens anything else (measured with 2.0.11): the password file, the ACL, the TLS key, the persistence
folder, the log and the pid file are all opened as that user, and so is every file it rereads on SIGHUP,
mosquitto.conf included. A password file it cannot read on a reload empties its logins: everyone is refused (reason
135) until the next good reload. Later 2.0 releases also warn, and announce they will refuse, a password or ACL file
that others may read or that is not owned by the broker's own user and group. So the logins, the ACL and the TLS key
belong to the broker's account, mode 0600; mosquitto.conf and the folders it only reads belong to whoever runs
`broker-config`, in the broker's group; the MID CA's private key is never the broker's to read.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import tempfile
from dataclasses import dataclass
from pathlib import Path


class BrokerFilesError(Exception):
    """A broker file could not be given the owner or mode the broker needs; the file it would replace is kept."""


@dataclass(frozen=True)
class BrokerAccount:
    """The account Mosquitto runs as once it has dropped root: its user and primary group."""

    name: str
    uid: int
    gid: int

    @property
    def group(self) -> str:
        return grp.getgrgid(self.gid).gr_name


def broker_account(user: str) -> BrokerAccount | None:
    """The broker's account when this process may hand files to it (it runs as root), else None: the files then stay
    with the user running this, and Mosquitto must run as that user too (`user` has no effect unless started as root).
    Raises BrokerFilesError for a user this host does not know."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise BrokerFilesError(
            f"no user {user!r} on this host: install the mosquitto package or set [broker_config] user"
        ) from None
    return BrokerAccount(user, entry.pw_uid, entry.pw_gid)


def replace_file(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename, so a broker reload never reads
    half a file; the new file has `mode` and `owner` (uid, gid; None: the writer's own) from its first byte.

    Raises BrokerFilesError, keeping the old file, when the new one cannot be given that owner (only root may hand a
    file to another user)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                _hand_over(fd, path, owner)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def rewrite_file(path: Path, data: bytes) -> None:
    """`replace_file` keeping the owner, group and mode of the file replaced: the broker reads it as its own user,
    not as whoever rewrites it."""
    current = path.stat()
    replace_file(path, data, current.st_mode & 0o777, (current.st_uid, current.st_gid))


def _hand_over(fd: int, path: Path, owner: tuple[int, int]) -> None:
    try:
        os.fchown(fd, *owner)
    except PermissionError:
        raise BrokerFilesError(
            f"cannot give {path} the owner {owner[0]}:{owner[1]} the broker reads it as: only root may hand a file "
            "to another user (run this as root or as that user)"
        ) from None


def set_owner(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """chmod, and chown when `owner` is given (root only), for a file or folder written in place."""
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)


def folders_the_broker_cannot_enter(directory: Path, account: BrokerAccount) -> list[Path]:
    """The ancestors of `directory` that `account` may not traverse (so Mosquitto could not reach its files)."""
    groups = {account.gid} | {g.gr_gid for g in grp.getgrall() if account.name in g.gr_mem}
    blocked = []
    for folder in directory.resolve().parents:
        st = folder.stat()
        if st.st_uid == account.uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            blocked.append(folder)
    return blocked
