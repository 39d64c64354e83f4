"""A throwaway Debian bookworm root for installer tests: debootstrap once (about 1.5 min with Debian's mirror), kept
as a tarball, unpacked fresh for each test; /proc and /dev mounted into it while it is used. Needs root, debootstrap
and chroot (CI runs as root; `make test` installs debootstrap)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("python3", "python3-venv", "systemd", "i2c-tools", "ca-certificates")
"""What a fresh Raspberry Pi OS Lite has that matters to install.sh (it apt-installs what is missing)."""
MIRROR = os.environ.get("MIDGATE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("MIDGATE_TEST_ROOT_CACHE", "/var/tmp/midgate-test-roots"))


def _installer_torch_pin() -> str:
    """The torch install.sh pins (its `TORCH_VERSION=` line), so the wheelhouse holds the build it asks for."""
    for line in (REPO / "deploy/raspberrypi/install.sh").read_text().splitlines():
        if line.startswith("TORCH_VERSION="):
            return "torch==" + line.removeprefix("TORCH_VERSION=")
    raise LookupError("deploy/raspberrypi/install.sh has no TORCH_VERSION= line")


TORCH_PIN = _installer_torch_pin()


def missing_tools() -> str | None:
    """Why the root cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root (chroot, mounts)"
    for tool in ("debootstrap", "chroot", "mount"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is missing ('apt-get install {tool}')"
    return None


def root_tarball() -> Path:
    """The cached tarball of a minbase bookworm with PACKAGES, built on first use."""
    key = hashlib.sha256(" ".join(("bookworm", MIRROR, *PACKAGES)).encode()).hexdigest()[:12]
    tarball = CACHE / f"bookworm-{key}.tar"
    with _cache_lock():
        if not tarball.exists():
            _debootstrap(tarball, CACHE / f"build-{key}")
    return tarball


@contextmanager
def _cache_lock() -> Iterator[None]:
    """One builder at a time: two test workers (or two checkouts) first needing the root or the wheelhouse would
    otherwise debootstrap into the same folder or download into the same wheelhouse at once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _debootstrap(tarball: Path, build: Path) -> None:
    shutil.rmtree(build, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm", str(build), MIRROR],
        check=True,
        capture_output=True,
    )
    partial = tarball.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(build), "-cf", str(partial), "."], check=True)
    partial.rename(tarball)
    shutil.rmtree(build)


@contextmanager
def debian_root(where: Path) -> Iterator[Path]:
    """A fresh root unpacked under `where`, with /proc mounted (unmounted on exit, even on failure). The root keeps
    debootstrap's own /dev nodes: the host's /dev is never bound in, so deleting the tmp folder can never reach it."""
    root = where / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(root_tarball())], check=True)
    # debootstrap leaves no /etc/hosts (an installed system has one): without it `localhost` does not resolve.
    hosts = root / "etc/hosts"
    if not hosts.exists():
        hosts.write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    proc = root / "proc"
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "--lazy", str(proc)], check=False)


def project_wheels(out: Path) -> tuple[Path, Path]:
    """(midgate's wheel built from this checkout, a wheelhouse with every dependency and the pinned CPU torch).
    The wheelhouse is kept beside the root tarball; pip only fetches what it lacks."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("midgate-*.whl")
    wheelhouse = CACHE / "wheelhouse"
    with _cache_lock():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "-d", str(wheelhouse), TORCH_PIN, str(wheel)],
            check=True,
            capture_output=True,
        )
    return wheel, wheelhouse
