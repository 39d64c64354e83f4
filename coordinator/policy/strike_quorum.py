"""STRIKE_QUORUM leaves: `serve` logs each data strike coming into force at the policy's quorum, and ending.

A strike's state changes without any one message saying so: a vote or a withdrawal is logged, a vote's `end_ms`
passes, a member leaves (its votes stop counting and the quorum shrinks), the policy's `[strikes]` changes. So the
log's one writer looks again every second (`StrikeQuorumLog.run`, beside the policy file's follower) at the tally
job start and quotes use (coordinator.registry.strikes) and appends a leaf (protocol.strike_quorum) for every target
whose state differs from what the log last said about it. The last state per target is read back from the log at
start, so a restart logs nothing twice and a change while `serve` was down is logged when it comes back.

Blocking (SQLite reads, appends): `run` does them in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator.ledger.store import LedgerReader, LedgerStore
from coordinator.policy.document import StrikePolicy
from coordinator.registry.store import Registry
from coordinator.registry.strikes import StrikeCount, StrikeTally, StrikeTarget
from protocol.leaves import Leaf, LeafKind, decode_leaf
from protocol.strike_quorum import StrikeQuorumRecord, decode_strike_quorum

log = logging.getLogger("midgate.strikes")
FOLLOW_PERIOD_S = 1.0


def logged_strikes(reader: LedgerReader) -> dict[StrikeTarget, tuple[int, StrikeQuorumRecord]]:
    """Target -> (leaf index, record) of the latest STRIKE_QUORUM leaf about it, in log order."""
    latest: dict[StrikeTarget, tuple[int, StrikeQuorumRecord]] = {}
    for index, data in reader.leaves(0, reader.size):
        leaf = decode_leaf(data)
        if leaf.kind is LeafKind.STRIKE_QUORUM:
            record = decode_strike_quorum(leaf.signed)
            latest[StrikeTarget(record.target_buyer, record.target_purpose)] = (index, record)
    return latest


def strikes_in_force(reader: LedgerReader) -> list[tuple[int, StrikeQuorumRecord]]:
    """The strikes the log last said are in force, with the leaf that said so."""
    return [entry for entry in logged_strikes(reader).values() if entry[1].in_force]


@dataclass(frozen=True)
class StrikePolicyInForce:
    strikes: StrikePolicy
    version: int
    """The POLICY leaf version it comes from (0 before the first)."""


class StrikeQuorumLog:
    """`serve`'s one appender of STRIKE_QUORUM leaves.

    Parameters
    ----------
    ledger: the MID's ledger (the one writer's store).
    registry: where ingest keeps the logged strike votes and the devices (who is an active member).
    policy: the `[strikes]` in force now and its version (PolicyLog's current version).
    clock_ms: now, in ms (default the wall clock).
    """

    def __init__(
        self,
        ledger: LedgerStore,
        registry: Registry,
        policy: Callable[[], StrikePolicyInForce],
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.ledger = ledger
        self.registry = registry
        self.policy = policy
        self.clock_ms = clock_ms
        self._in_force = {target for target, (_, record) in logged_strikes(ledger).items() if record.in_force}

    @property
    def in_force(self) -> set[StrikeTarget]:
        return set(self._in_force)

    def sync(self) -> list[int]:
        """Append a leaf for every target whose strike came into force or ended since the log last said; returns
        their indices."""
        current = self.policy()
        now = self.clock_ms()
        strikes = current.strikes
        tally = StrikeTally(
            self.registry.strike_votes(), self.registry.devices(), strikes.quorum_bps, now, strikes.min_members
        )
        counts = {count.target: count for count in tally.counts()}
        for target in self._in_force - counts.keys():
            counts[target] = tally.count(target)  # nobody votes against it any more: it ends
        changed = [c for t, c in sorted(counts.items(), key=_order) if c.in_force != (t in self._in_force)]
        if not changed:
            return []
        records = [self._record(c, tally, current, now) for c in changed]
        appended = self.ledger.append_leaves([Leaf(LeafKind.STRIKE_QUORUM, r.canonical_json()) for r in records])
        for index, record in zip(appended.indices, records, strict=True):
            target = StrikeTarget(record.target_buyer, record.target_purpose)
            if record.in_force:
                self._in_force.add(target)
            else:
                self._in_force.discard(target)
            log.warning(
                "strike in force: no new job for its target" if record.in_force else "strike ended",
                extra={
                    "target": record.target_text(),
                    "strikers": record.strikers,
                    "needed": record.needed,
                    "running_jobs": record.running_jobs,
                    "leaf_index": index,
                },
            )
        return list(appended.indices)

    @staticmethod
    def _record(count: StrikeCount, tally: StrikeTally, current: StrikePolicyInForce, now: int) -> StrikeQuorumRecord:
        return StrikeQuorumRecord(
            target_buyer=count.target.buyer,
            target_purpose=count.target.purpose,
            in_force=count.in_force,
            strikers=len(count.strikers),
            needed=count.needed,
            active_members=count.active_members,
            policy_version=current.version,
            running_jobs=current.strikes.running_jobs,
            at_ms=now,
            counted_votes=tally.counted_votes(count.target),
        )

    async def run(self, stopped: asyncio.Event, period_s: float = FOLLOW_PERIOD_S) -> None:
        """`sync` every `period_s` until `stopped` is set."""
        while not stopped.is_set():
            try:
                await asyncio.to_thread(self.sync)
            except Exception:
                log.exception("logging strike quorum changes failed")  # a storage error must not end serve
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), timeout=period_s)


def _order(item: tuple[StrikeTarget, StrikeCount]) -> tuple[str, str]:
    return (item[0].buyer or "", item[0].purpose or "")


__all__ = ["StrikePolicyInForce", "StrikeQuorumLog", "logged_strikes", "strikes_in_force"]
