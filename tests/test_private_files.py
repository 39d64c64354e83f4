"""Data folders are created 0700 and databases 0600 on both sides, whatever the umask: the folders and SQLite files
each role creates (with their -wal and -shm files), and nothing that existed before changes its mode."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.config import CoordinatorSettings
from coordinator.ledger.dedup import DedupIndex
from coordinator.registry.store import Registry
from coordinator.serve.assembly import open_storage
from edge.agent.controls.state import MemberState, editing, save_member_state
from edge.agent.membership import MembershipRecord, save_membership
from edge.durable_file import replace_file
from edge.sensors.config import SampleStoreConfig
from protocol.enrolment import BrokerCredentials
from protocol.identity import SignerKey
from protocol.private_files import private_dir, private_file


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The most permissive umask a host may have: every mode below is the code's, not the umask's."""
    before = os.umask(0)
    try:
        yield
    finally:
        os.umask(before)


def test_private_dir_creates_every_missing_folder_0700_and_leaves_existing_ones_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    created = private_dir(shared / "a" / "b")
    assert created == shared / "a" / "b"
    assert (_mode(shared), _mode(shared / "a"), _mode(shared / "a" / "b")) == (0o755, 0o700, 0o700)
    private_dir(shared / "a" / "b")  # again: nothing to do


def test_private_file_is_created_0600_once_and_an_existing_one_keeps_its_mode(tmp_path: Path) -> None:
    path = private_file(tmp_path / "x" / "db.sqlite")
    assert (_mode(path), _mode(path.parent), path.read_bytes()) == (0o600, 0o700, b"")
    path.write_bytes(b"kept")
    path.chmod(0o640)
    private_file(path)
    assert (_mode(path), path.read_bytes()) == (0o640, b"kept")


def test_the_coordinators_data_folder_and_databases(tmp_path: Path) -> None:
    settings = CoordinatorSettings(mid="riverside", data_dir=tmp_path / "coordinator" / "data")
    storage = open_storage(settings)
    try:
        storage.registry.add_invite("inv-1", "ann", 1, 2)  # a write: the -wal file exists
        storage.dedup.record([], 0)
    finally:
        storage.close()
    assert _mode(tmp_path / "coordinator") == 0o700 and _mode(settings.data_dir) == 0o700
    for name in ("ledger.sqlite", "registry.sqlite", "ingest.sqlite"):
        assert _mode(settings.data_dir / name) == 0o600, name
    for extra in settings.data_dir.glob("*.sqlite-*"):
        assert _mode(extra) == 0o600, extra.name


def test_databases_opened_alone_are_0600_in_0700_folders(tmp_path: Path) -> None:
    Registry(tmp_path / "r" / "registry.sqlite").close()
    DedupIndex(tmp_path / "i" / "ingest.sqlite").close()
    assert (_mode(tmp_path / "r"), _mode(tmp_path / "r" / "registry.sqlite")) == (0o700, 0o600)
    assert (_mode(tmp_path / "i"), _mode(tmp_path / "i" / "ingest.sqlite")) == (0o700, 0o600)


def test_the_agents_membership_folder_and_files(tmp_path: Path) -> None:
    directory = tmp_path / "agent" / "mids" / "riverside"
    broker = BrokerCredentials(host="mid.example", port=8883, tls=False, username="d-1", password="p" * 20)
    record = MembershipRecord(
        mid="riverside",
        device="d-1",
        member="ann",
        mid_key=SignerKey.generate("riverside-log").verifier.text(),
        enrolment_url="http://mid.example",
        broker=broker,
        enrolled_ms=1,
    )
    save_membership(directory, record)
    for folder in (tmp_path / "agent", tmp_path / "agent" / "mids", directory):
        assert _mode(folder) == 0o700, folder
    assert _mode(directory / "membership.json") == 0o600
    with editing(tmp_path / "agent2" / "mids" / "m"):
        save_member_state(tmp_path / "agent2" / "mids" / "m", MemberState(paused_ms=1_795_000_000_000))
    assert (_mode(tmp_path / "agent2"), _mode(tmp_path / "agent2" / "mids" / "m" / "member.json")) == (0o700, 0o600)
    store = SampleStoreConfig(path=tmp_path / "agent4" / "samples.db").open()
    store.close()
    assert (_mode(tmp_path / "agent4"), _mode(tmp_path / "agent4" / "samples.db")) == (0o700, 0o600)
    replace_file(tmp_path / "agent3" / "f.json", b"{}")
    assert (_mode(tmp_path / "agent3"), _mode(tmp_path / "agent3" / "f.json")) == (0o700, 0o600)
