"""The MID's registry (SQLite, 0600): members, their devices and device keys, invites, revocations, rate limits, and
what devices last said about themselves (presence, strike votes).

Every write is one `BEGIN IMMEDIATE` transaction with `synchronous=FULL`: an invite must never be redeemable
twice, and a revocation must survive a crash. `version` increases with every change so that long-running readers
(the ingest pipeline keeps keys in memory) can notice edits made by another process (`midgate coordinator revoke`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.registry.member_choices import ConsentRecord, Departure, KnobSetting
from coordinator.registry.presence import Presence, StrikeVoteRecord
from protocol.errors import InviteExpiredError, InviteInvalidError, InviteUsedError, MalformedError
from protocol.identity import VerifierKey
from protocol.messages import DeviceStatus, TaskSensors
from protocol.private_files import private_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('version', 0);
CREATE TABLE IF NOT EXISTS members (
    member_id TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS invites (
    invite_id TEXT PRIMARY KEY,
    member_id TEXT NOT NULL REFERENCES members(member_id),
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER,
    device_id TEXT
);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    member_id TEXT NOT NULL REFERENCES members(member_id),
    verifier_key TEXT NOT NULL UNIQUE,
    key_id BLOB NOT NULL,
    broker_password_hash TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    rate_per_s REAL,
    rate_burst INTEGER
);
CREATE INDEX IF NOT EXISTS devices_by_key_id ON devices(key_id);
-- A member's hub (a Pi whose Mosquitto bridges the member's other devices to the MID's broker) logs in with one
-- login that may carry only the messages of that member's devices (coordinator.broker.config.render_acl).
CREATE TABLE IF NOT EXISTS relays (
    name TEXT PRIMARY KEY,
    member_id TEXT NOT NULL REFERENCES members(member_id),
    password_hash TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
-- Which registry facts are in the ledger yet. The two files cannot share a transaction, so the registry remembers
-- what still has to be logged and the ledger's writer (coordinator serve) logs it, also after a crash.
CREATE TABLE IF NOT EXISTS ledger_records (
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    kind TEXT NOT NULL CHECK (kind IN ('enrol', 'revoke')),
    signed BLOB,
    leaf_index INTEGER,
    PRIMARY KEY (device_id, kind)
);
-- A device's Flower SuperNode key as registered with the MID's SuperLink: node_id <-> device <-> member.
CREATE TABLE IF NOT EXISTS flower_nodes (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    node_id INTEGER NOT NULL UNIQUE,
    public_key TEXT NOT NULL UNIQUE,
    registered_ms INTEGER NOT NULL
);
-- What each device last said about itself (coordinator/registry/presence.py): written by serve's ingest in batches,
-- read by `coordinator devices` and `job start`.
CREATE TABLE IF NOT EXISTS device_presence (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    status TEXT NOT NULL,
    status_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    offline INTEGER NOT NULL
);
-- Every StrikeVote the ledger logged, by leaf index: who strikes against whom, without reading the whole log.
CREATE TABLE IF NOT EXISTS strike_votes (
    leaf_index INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    target_buyer TEXT,
    target_purpose TEXT,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER,
    withdraw INTEGER NOT NULL
);
-- Devices revoked because their member left (a logged LeaveNotice): such a key may still read its member's statement.
CREATE TABLE IF NOT EXISTS departures (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    member_id TEXT NOT NULL REFERENCES members(member_id),
    leaf_index INTEGER NOT NULL,
    left_ms INTEGER NOT NULL
);
-- Each member's latest logged KnobUpdate and ConsentPolicy (the one with the highest leaf index wins).
CREATE TABLE IF NOT EXISTS member_knobs (
    member_id TEXT PRIMARY KEY REFERENCES members(member_id),
    bias_milli INTEGER NOT NULL,
    leaf_index INTEGER NOT NULL,
    device_time_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS member_consents (
    member_id TEXT PRIMARY KEY REFERENCES members(member_id),
    allowed_purposes TEXT NOT NULL,
    denied_buyers TEXT NOT NULL,
    leaf_index INTEGER NOT NULL
);
-- The sensors per task of each member's latest consent (a table of its own, so registries made before it need no
-- migration): JSON [{"task_id": .., "sensors": [..]}], written with member_consents in one transaction.
CREATE TABLE IF NOT EXISTS member_consent_sensors (
    member_id TEXT PRIMARY KEY REFERENCES members(member_id),
    task_sensors TEXT NOT NULL,
    leaf_index INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Invite:
    invite_id: str
    member_id: str
    created_ms: int
    expires_ms: int
    used_ms: int | None
    device_id: str | None


@dataclass(frozen=True)
class Device:
    device_id: str
    member_id: str
    verifier: VerifierKey
    broker_password_hash: str
    enrolled_ms: int
    revoked_ms: int | None
    rate_per_s: float | None
    rate_burst: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None


@dataclass(frozen=True)
class Relay:
    """A hub's login on the MID's broker, carrying the messages of its member's devices."""

    name: str
    member_id: str
    password_hash: str
    created_ms: int
    revoked_ms: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None


class RelayError(ValueError):
    """A relay that cannot be added: its member was never invited, or its name is taken."""


@dataclass(frozen=True)
class RosterEntry:
    device_id: str
    member_id: str
    enrolled_ms: int
    revoked_ms: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None


class Registry:
    """One SQLite file; safe to open from several processes (WAL) and to share between threads: `serve` holds one
    instance for ingest's worker thread, the HTTP endpoint's threads and the contribution gate. Every statement and
    every write transaction runs under one lock, so no thread's statements ever land inside another's transaction."""

    def __init__(self, path: Path) -> None:
        private_file(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self, bump_version: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                if bump_version:
                    self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'version'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _row(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, params).fetchone()

    def version(self) -> int:
        return int(self._row("SELECT value FROM meta WHERE name = 'version'")[0])

    def add_invite(self, invite_id: str, member_id: str, now_ms: int, expires_ms: int) -> Invite:
        """Record a new invite for `member_id` (the member is created on first invite)."""
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO members VALUES (?, ?)", (member_id, now_ms))
            db.execute(
                "INSERT INTO invites (invite_id, member_id, created_ms, expires_ms) VALUES (?, ?, ?, ?)",
                (invite_id, member_id, now_ms, expires_ms),
            )
        return Invite(invite_id, member_id, now_ms, expires_ms, None, None)

    def invite(self, invite_id: str) -> Invite | None:
        row = self._row(
            "SELECT invite_id, member_id, created_ms, expires_ms, used_ms, device_id FROM invites WHERE invite_id = ?",
            (invite_id,),
        )
        return Invite(*row) if row else None

    def redeem_invite(
        self,
        invite_id: str,
        now_ms: int,
        device_id: str,
        verifier: VerifierKey,
        broker_password_hash: str,
        request: bytes | None = None,
    ) -> Device:
        """Use the invite once and register the device, atomically; expired, used or unknown invites raise.

        `request` (the signed EnrolmentRequest) is kept in the same transaction as owed to the ledger, so an
        enrolment the coordinator crashed before logging is logged at its next start (`unlogged`).
        """
        with self._write() as db:
            row = db.execute(
                "SELECT member_id, expires_ms, used_ms FROM invites WHERE invite_id = ?", (invite_id,)
            ).fetchone()
            if row is None:
                raise InviteInvalidError("no such invite", invite_id=invite_id)
            member_id, expires_ms, used_ms = row
            if used_ms is not None:
                raise InviteUsedError("invite already used", invite_id=invite_id, used_ms=used_ms)
            if now_ms >= expires_ms:
                raise InviteExpiredError("invite expired", invite_id=invite_id, expires_ms=expires_ms, now_ms=now_ms)
            try:
                db.execute(
                    "INSERT INTO devices (device_id, member_id, verifier_key, key_id, broker_password_hash,"
                    " enrolled_ms) VALUES (?, ?, ?, ?, ?, ?)",
                    (device_id, member_id, verifier.text(), verifier.key_id, broker_password_hash, now_ms),
                )
            except sqlite3.IntegrityError as exc:
                raise MalformedError("device id or key already enrolled", device_id=device_id) from exc
            db.execute(
                "UPDATE invites SET used_ms = ?, device_id = ? WHERE invite_id = ?", (now_ms, device_id, invite_id)
            )
            if request is not None:
                db.execute("INSERT INTO ledger_records VALUES (?, 'enrol', ?, NULL)", (device_id, request))
        return Device(device_id, member_id, verifier, broker_password_hash, now_ms, None, None, None)

    def revoke(self, device_id: str, now_ms: int) -> bool:
        """Revoke a device's key; True when it was active. Its broker login is dropped at the next config write."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE devices SET revoked_ms = ? WHERE device_id = ? AND revoked_ms IS NULL", (now_ms, device_id)
            )
            if cur.rowcount == 1:
                # The signed KeyRevocation is made by the ledger's writer, which holds the MID key.
                db.execute("INSERT OR IGNORE INTO ledger_records VALUES (?, 'revoke', NULL, NULL)", (device_id,))
            return cur.rowcount == 1

    def unlogged(self, kind: str) -> list[tuple[Device, bytes | None]]:
        """Devices whose `kind` ('enrol' or 'revoke') is not in the ledger yet, with the signed bytes if stored."""
        rows = self._rows(
            "SELECT r.device_id, r.signed FROM ledger_records r WHERE r.kind = ? AND r.leaf_index IS NULL"
            " ORDER BY r.rowid",
            (kind,),
        )
        found = []
        for device_id, signed in rows:
            device = self.device(device_id)
            if device is not None:
                found.append((device, None if signed is None else bytes(signed)))
        return found

    def mark_logged(self, kind: str, entries: list[tuple[str, int]]) -> None:
        """Record the ledger leaf index of each (device_id, leaf_index) `kind` record. Does not bump `version`:
        nothing about keys or logins changed."""
        with self._write(bump_version=False) as db:
            db.executemany(
                "UPDATE ledger_records SET leaf_index = ? WHERE device_id = ? AND kind = ?",
                [(index, device_id, kind) for device_id, index in entries],
            )

    def enrol_request(self, device_id: str) -> bytes | None:
        row = self._row("SELECT signed FROM ledger_records WHERE device_id = ? AND kind = 'enrol'", (device_id,))
        return None if row is None or row[0] is None else bytes(row[0])

    def set_broker_password(self, device_id: str, broker_password_hash: str) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE devices SET broker_password_hash = ? WHERE device_id = ?", (broker_password_hash, device_id)
            )

    def logged_index(self, device_id: str, kind: str) -> int | None:
        row = self._row("SELECT leaf_index FROM ledger_records WHERE device_id = ? AND kind = ?", (device_id, kind))
        return None if row is None or row[0] is None else int(row[0])

    def set_rate_limit(self, device_id: str, per_s: float | None, burst: int | None) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE devices SET rate_per_s = ?, rate_burst = ? WHERE device_id = ?", (per_s, burst, device_id)
            )

    def device(self, device_id: str) -> Device | None:
        row = self._row(_DEVICE_SELECT + " WHERE device_id = ?", (device_id,))
        return _device(row) if row else None

    def devices(self) -> list[Device]:
        return [_device(row) for row in self._rows(_DEVICE_SELECT + " ORDER BY device_id")]

    def roster(self) -> list[RosterEntry]:
        """Every device's id, member and enrolment times, without parsing keys: what a page listing 1,000 devices
        needs (parsing each verifier key was most of that page's time, bench/dashboard_bench.py)."""
        rows = self._rows("SELECT device_id, member_id, enrolled_ms, revoked_ms FROM devices ORDER BY device_id")
        return [RosterEntry(str(d), str(m), int(e), None if r is None else int(r)) for d, m, e, r in rows]

    def add_flower_node(self, device_id: str, node_id: int, public_key: str, now_ms: int) -> None:
        """Remember the SuperLink node id registered for `device_id`'s Flower key (one per device)."""
        with self._write() as db:
            try:
                # SQLite integers are signed 64-bit; Flower node ids are unsigned 64-bit.
                db.execute(
                    "INSERT INTO flower_nodes VALUES (?, ?, ?, ?)",
                    (device_id, node_id - (1 << 64) if node_id >= 1 << 63 else node_id, public_key, now_ms),
                )
            except sqlite3.IntegrityError as exc:
                raise MalformedError("device, node id or Flower key already registered", device_id=device_id) from exc

    def flower_node(self, device_id: str) -> FlowerNode | None:
        row = self._row(_NODE_SELECT + " WHERE f.device_id = ?", (device_id,))
        return _flower_node(row) if row else None

    def flower_node_by_id(self, node_id: int) -> FlowerNode | None:
        signed = node_id - (1 << 64) if node_id >= 1 << 63 else node_id
        row = self._row(_NODE_SELECT + " WHERE f.node_id = ?", (signed,))
        return _flower_node(row) if row else None

    def record_presence(self, entries: Sequence[Presence]) -> None:
        """Merge what ingest heard since its last write, in one transaction that leaves `version` alone (no key or
        login changed). A last will (`offline`) keeps the status the device had; a status is kept with the time it
        was first heard."""
        with self._write(bump_version=False) as db:
            db.executemany(
                "INSERT INTO device_presence VALUES (?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET"
                " status = CASE WHEN excluded.offline THEN status ELSE excluded.status END,"
                " status_ms = CASE WHEN excluded.offline OR excluded.status = status THEN status_ms"
                " ELSE excluded.status_ms END,"
                " last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms),"
                " offline = excluded.offline",
                [(p.device_id, str(p.status), p.status_ms, p.last_seen_ms, int(p.offline)) for p in entries],
            )

    def presence(self) -> dict[str, Presence]:
        """Device id -> what it last said about itself (devices never heard from have no entry)."""
        rows = self._rows("SELECT device_id, status, status_ms, last_seen_ms, offline FROM device_presence")
        return {row[0]: Presence(row[0], DeviceStatus(row[1]), row[2], row[3], bool(row[4])) for row in rows}

    def record_strike_votes(self, votes: Sequence[StrikeVoteRecord]) -> None:
        """Keep logged StrikeVotes; a vote already kept (same leaf) is left as it is."""
        with self._write(bump_version=False) as db:
            db.executemany(
                "INSERT OR IGNORE INTO strike_votes VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (v.leaf_index, v.device_id, v.target_buyer, v.target_purpose, v.start_ms, v.end_ms, int(v.withdraw))
                    for v in votes
                ],
            )

    def strike_votes(self) -> list[StrikeVoteRecord]:
        """Every logged StrikeVote and withdrawal, in log order."""
        rows = self._rows(
            "SELECT leaf_index, device_id, target_buyer, target_purpose, start_ms, end_ms, withdraw FROM strike_votes"
            " ORDER BY leaf_index"
        )
        return [
            StrikeVoteRecord(index, device, buyer, purpose, start_ms, end_ms, bool(withdraw))
            for index, device, buyer, purpose, start_ms, end_ms, withdraw in rows
        ]

    def record_departure(self, member_id: str, leaf_index: int, now_ms: int) -> list[str]:
        """The member's LeaveNotice was logged at `leaf_index`: revoke every active device of the member (each owed
        to the ledger as a key-revoke leaf, like `revoke`) and remember them as departed, in one transaction.
        Returns the devices revoked now (none when the departure was already recorded)."""
        with self._write() as db:
            rows = db.execute(
                "SELECT device_id FROM devices WHERE member_id = ? AND revoked_ms IS NULL ORDER BY device_id",
                (member_id,),
            ).fetchall()
            revoked = [device_id for (device_id,) in rows]
            for device_id in revoked:
                db.execute("UPDATE devices SET revoked_ms = ? WHERE device_id = ?", (now_ms, device_id))
                db.execute("INSERT OR IGNORE INTO ledger_records VALUES (?, 'revoke', NULL, NULL)", (device_id,))
                db.execute(
                    "INSERT OR IGNORE INTO departures VALUES (?, ?, ?, ?)", (device_id, member_id, leaf_index, now_ms)
                )
            return revoked

    def departures(self) -> dict[str, Departure]:
        """Device id -> its departure, for every device revoked because its member left."""
        rows = self._rows("SELECT device_id, member_id, leaf_index, left_ms FROM departures")
        return {row[0]: Departure(*row) for row in rows}

    def departed_members(self) -> set[str]:
        return {row[0] for row in self._rows("SELECT DISTINCT member_id FROM departures")}

    def record_knob(self, setting: KnobSetting) -> None:
        """Keep the member's knob if this leaf is its latest."""
        with self._write(bump_version=False) as db:
            db.execute(
                "INSERT INTO member_knobs VALUES (?, ?, ?, ?) ON CONFLICT(member_id) DO UPDATE SET"
                " bias_milli = excluded.bias_milli, leaf_index = excluded.leaf_index,"
                " device_time_ms = excluded.device_time_ms WHERE excluded.leaf_index > leaf_index",
                (setting.member_id, setting.bias_milli, setting.leaf_index, setting.device_time_ms),
            )

    def knobs(self) -> dict[str, KnobSetting]:
        rows = self._rows("SELECT member_id, bias_milli, leaf_index, device_time_ms FROM member_knobs")
        return {row[0]: KnobSetting(*row) for row in rows}

    def record_consent(self, consent: ConsentRecord) -> None:
        """Keep the member's consent if this leaf is its latest."""
        with self._write(bump_version=False) as db:
            db.execute(
                "INSERT INTO member_consents VALUES (?, ?, ?, ?) ON CONFLICT(member_id) DO UPDATE SET"
                " allowed_purposes = excluded.allowed_purposes, denied_buyers = excluded.denied_buyers,"
                " leaf_index = excluded.leaf_index WHERE excluded.leaf_index > leaf_index",
                (
                    consent.member_id,
                    json.dumps(None if consent.allowed_purposes is None else list(consent.allowed_purposes)),
                    json.dumps(list(consent.denied_buyers)),
                    consent.leaf_index,
                ),
            )
            db.execute(
                "INSERT INTO member_consent_sensors VALUES (?, ?, ?) ON CONFLICT(member_id) DO UPDATE SET"
                " task_sensors = excluded.task_sensors, leaf_index = excluded.leaf_index"
                " WHERE excluded.leaf_index > leaf_index",
                (
                    consent.member_id,
                    json.dumps([t.model_dump(mode="json") for t in consent.task_sensors]),
                    consent.leaf_index,
                ),
            )

    def consents(self) -> dict[str, ConsentRecord]:
        rows = self._rows(
            "SELECT c.member_id, c.allowed_purposes, c.denied_buyers, c.leaf_index, s.task_sensors"
            " FROM member_consents c LEFT JOIN member_consent_sensors s"
            " ON s.member_id = c.member_id AND s.leaf_index = c.leaf_index"
        )
        return {
            member: ConsentRecord(
                member,
                _purposes(json.loads(allowed)),
                tuple(json.loads(denied)),
                index,
                tuple(TaskSensors.model_validate_json(json.dumps(t)) for t in json.loads(sensors or "[]")),
            )
            for member, allowed, denied, index, sensors in rows
        }

    def active_password_hashes(self) -> dict[str, str]:
        """Broker logins of every device that is not revoked."""
        rows = self._rows("SELECT device_id, broker_password_hash FROM devices WHERE revoked_ms IS NULL")
        return {device_id: hashed for device_id, hashed in rows}

    def add_relay(self, name: str, member_id: str, password_hash: str, now_ms: int) -> Relay:
        """Record a hub's relay login for `member_id`'s devices. A name is never reused, also once revoked: the
        broker's ACL and the operator's records then always mean one hub by one name."""
        with self._write() as db:
            if db.execute("SELECT 1 FROM members WHERE member_id = ?", (member_id,)).fetchone() is None:
                raise RelayError(f"no member {member_id}: invite them first (`midgate coordinator invite`)")
            if db.execute("SELECT 1 FROM relays WHERE name = ?", (name,)).fetchone() is not None:
                raise RelayError(f"relay {name} exists already (names are not reused, also after a revoke)")
            db.execute("INSERT INTO relays VALUES (?, ?, ?, ?, NULL)", (name, member_id, password_hash, now_ms))
        return Relay(name, member_id, password_hash, now_ms, None)

    def revoke_relay(self, name: str, now_ms: int) -> bool:
        """True when the relay was active; its broker login goes at the next config write."""
        with self._write() as db:
            cur = db.execute("UPDATE relays SET revoked_ms = ? WHERE name = ? AND revoked_ms IS NULL", (now_ms, name))
            return cur.rowcount == 1

    def relays(self) -> list[Relay]:
        rows = self._rows("SELECT name, member_id, password_hash, created_ms, revoked_ms FROM relays ORDER BY name")
        return [Relay(*row) for row in rows]

    def relay_devices(self) -> dict[str, list[str]]:
        """Each active relay's name -> the devices of its member that are not revoked (sorted): what it may carry."""
        rows = self._rows(
            "SELECT r.name, d.device_id FROM relays r LEFT JOIN devices d"
            " ON d.member_id = r.member_id AND d.revoked_ms IS NULL WHERE r.revoked_ms IS NULL"
            " ORDER BY r.name, d.device_id"
        )
        carried: dict[str, list[str]] = {}
        for name, device_id in rows:
            devices = carried.setdefault(name, [])
            if device_id is not None:
                devices.append(device_id)
        return carried


def _purposes(stored: list[str] | None) -> tuple[str, ...] | None:
    return None if stored is None else tuple(stored)


_DEVICE_SELECT = (
    "SELECT device_id, member_id, verifier_key, broker_password_hash, enrolled_ms, revoked_ms, rate_per_s, rate_burst"
    " FROM devices"
)


def _device(row: tuple[str, str, str, str, int, int | None, float | None, int | None]) -> Device:
    device_id, member_id, vkey, hashed, enrolled_ms, revoked_ms, rate, burst = row
    return Device(device_id, member_id, VerifierKey.parse(vkey), hashed, enrolled_ms, revoked_ms, rate, burst)


@dataclass(frozen=True)
class FlowerNode:
    node_id: int
    device_id: str
    member_id: str
    public_key: str
    registered_ms: int


_NODE_SELECT = (
    "SELECT f.node_id, f.device_id, d.member_id, f.public_key, f.registered_ms"
    " FROM flower_nodes f JOIN devices d USING (device_id)"
)


def _flower_node(row: tuple[int, str, str, str, int]) -> FlowerNode:
    node_id, device_id, member_id, public_key, registered_ms = row
    return FlowerNode(node_id % (1 << 64), device_id, member_id, public_key, registered_ms)
