"""POLICY leaves: every version of the MID's policy, in the log, and which version a quote or settlement uses.

A POLICY leaf's body is a `PolicyRecord`'s canonical JSON: the version (1 for the first, +1 for each change), the
SHA-256 of the policy's canonical JSON, when it was applied, and the whole policy, so a member or auditor reads the fee
and the rules of any version from the log alone. `serve`, the log's one writer, appends one when it starts with a
policy that differs from the latest logged one, and while it runs whenever the policy file changes
(`PolicyLog.follow`); `midgate coordinator policy apply FILE` installs a file for it to log.

Which version applies (the issue's rule: a change applies to quotes made after it, never to running or settled jobs):
- a quote takes the version current when it is made (`current_policy`, `PolicyLog.current`) and keeps its number;
- a settlement takes the version its job was quoted under; a job started without a quote (`job start`) takes the
  version in force when it started (`PolicyLog.at`), so a change while it runs does not touch it;
- a settled job's record holds its policy, so nothing later changes it.

Blocking (SQLite reads, appends): async callers use asyncio.to_thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.ledger.store import LedgerReader, LedgerStore
from coordinator.policy.document import LeaveDefaults, MidPolicy
from coordinator.royalties.policy import RoyaltyPolicy
from protocol.errors import MalformedError, ProtocolError
from protocol.leaves import MAX_SIGNED_SIZE, Leaf, LeafKind, decode_leaf

log = logging.getLogger("midgate.policy")
FOLLOW_PERIOD_S = 1.0


class PolicyRecord(BaseModel):
    """The body of a POLICY leaf."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    schema_id: Literal["midgate.policy.v1"] = "midgate.policy.v1"
    version: int = Field(ge=1)
    policy_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    applied_ms: int = Field(ge=0)
    policy: MidPolicy

    def canonical_json(self) -> bytes:
        import json

        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class LoggedPolicy:
    """A policy version as the log holds it: its leaf's index and record."""

    index: int
    record: PolicyRecord

    @property
    def version(self) -> int:
        return self.record.version

    @property
    def policy(self) -> MidPolicy:
        return self.record.policy

    def royalty(self) -> RoyaltyPolicy:
        """The money part under this version's number, as settlement records carry it."""
        return self.record.policy.royalty(self.record.version)


def decode_policy_record(data: bytes) -> PolicyRecord:
    """A POLICY leaf's body; size first, then the strict schema, the hash it claims, and the canonical form."""
    if len(data) > MAX_SIGNED_SIZE:
        raise MalformedError("policy record too large", limit=MAX_SIGNED_SIZE, found=len(data))
    try:
        record = PolicyRecord.model_validate_json(data)
    except ValidationError as exc:
        raise MalformedError("not a policy record", first=exc.errors()[0]["msg"]) from None
    if record.policy.content_sha256() != record.policy_sha256:
        raise MalformedError("policy record's hash is not its policy's", version=record.version)
    if record.canonical_json() != data:
        raise MalformedError("policy record is not in canonical encoding", version=record.version)
    return record


def iter_policies(reader: LedgerReader, start: int = 0) -> Iterator[LoggedPolicy]:
    """Every POLICY leaf from `start` on, in log order."""
    for index, data in reader.leaves(start, reader.size):
        leaf = decode_leaf(data)
        if leaf.kind is LeafKind.POLICY:
            yield LoggedPolicy(index, decode_policy_record(leaf.signed))


def current_policy(reader: LedgerReader) -> LoggedPolicy | None:
    """The policy version current now: the latest POLICY leaf (None before the first). What a quote made now uses
    (read-only; `serve`'s own `PolicyLog.current` answers without reading the log)."""
    latest = None
    for logged in iter_policies(reader):
        latest = logged
    return latest


def policy_at(reader: LedgerReader, time_ms: int) -> LoggedPolicy | None:
    """The version in force at `time_ms` (the last applied at or before it; None before the first): what a job
    started then without a quote runs, and is settled, under."""
    found = None
    for logged in iter_policies(reader):
        if logged.record.applied_ms <= time_ms:
            found = logged
    return found


def policy_version(reader: LedgerReader, version: int) -> LoggedPolicy:
    """The logged policy of `version` (e.g. the one a quote named)."""
    for logged in iter_policies(reader):
        if logged.version == version:
            return logged
    raise MalformedError("no POLICY leaf of this version", version=version)


class PolicyLog:
    """`serve`'s view of the policy versions in its log, and the one place that appends POLICY leaves.

    Parameters
    ----------
    ledger: the MID's log; this process is its writer.
    source: reads the policy now in force (the policy file, or `[royalties]`); may raise ProtocolError for a bad
        file, which is logged and leaves the current version in force.
    stamp: what changes when the source may have changed (the file's mtime and size); `follow` reads the source only
        when it differs from the last one seen.
    """

    def __init__(
        self,
        ledger: LedgerStore,
        source: Callable[[], MidPolicy],
        stamp: Callable[[], object] = lambda: None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.ledger = ledger
        self.source = source
        self.stamp = stamp
        self.clock_ms = clock_ms
        self._versions = list(iter_policies(ledger))
        self._seen: object = object()

    @property
    def versions(self) -> list[LoggedPolicy]:
        return list(self._versions)

    def current(self) -> LoggedPolicy | None:
        return self._versions[-1] if self._versions else None

    def at(self, time_ms: int) -> LoggedPolicy | None:
        """The version in force at `time_ms`: the last applied at or before it (None before the first)."""
        found = None
        for logged in self._versions:
            if logged.record.applied_ms <= time_ms:
                found = logged
        return found

    def version(self, version: int) -> LoggedPolicy:
        for logged in self._versions:
            if logged.version == version:
                return logged
        raise MalformedError("no POLICY leaf of this version", version=version)

    def sync(self) -> LoggedPolicy | None:
        """Read the source and append a POLICY leaf when it differs from the current version; returns the new
        version, or None when nothing changed. Raises the source's ProtocolError (nothing is appended)."""
        policy = self.source()
        current = self.current()
        digest = policy.content_sha256()
        if current is not None and current.record.policy_sha256 == digest:
            return None
        record = PolicyRecord(
            version=1 if current is None else current.version + 1,
            policy_sha256=digest,
            applied_ms=self.clock_ms(),
            policy=policy,
        )
        index = self.ledger.append_leaves([Leaf(LeafKind.POLICY, record.canonical_json())]).first_index
        logged = LoggedPolicy(index, record)
        self._versions.append(logged)
        log.info(
            "policy logged",
            extra={"version": record.version, "leaf_index": index, "policy_sha256": digest, "fee_bps": policy.fee_bps},
        )
        if policy.leave.royalties_continue and policy.leave.notice_days != LeaveDefaults().notice_days:
            # notice_days only delays the end of a departed member's royalties; while they continue it does nothing.
            log.warning(
                "policy [leave] notice_days has no effect while royalties_continue = true",
                extra={"royalties_continue": policy.leave.royalties_continue, "notice_days": policy.leave.notice_days},
            )
        return logged

    def follow(self) -> LoggedPolicy | None:
        """`sync` when the source's stamp changed since the last look; a bad file is logged once per change."""
        stamp = self.stamp()
        if stamp == self._seen:
            return None
        self._seen = stamp
        try:
            return self.sync()
        except ProtocolError as error:
            log.error("policy file refused; the current version stays in force", extra={"reason": str(error)[:500]})
            return None

    async def run(self, stopped: asyncio.Event, period_s: float = FOLLOW_PERIOD_S) -> None:
        """Follow the policy file until `stopped` is set; appends run in a worker thread."""
        while not stopped.is_set():
            try:
                await asyncio.to_thread(self.follow)
            except Exception:
                log.exception("following the policy file failed")  # a storage error must not end serve
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), timeout=period_s)
