"""What the ledger says, read as an auditor reads it: the leaves of the coordinator's log file, decoded with the
protocol's own decoders, nothing recomputed. The demo's summary table and its waits come from here, and the test
checks the summary against the same file read its own way.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.ledger.store import LedgerReader
from coordinator.royalties.settlement import SplitRecord, decode_record
from protocol.envelope import peek_envelope
from protocol.identity import VerifierKey
from protocol.job_log import JobLogRecord, RoundLogRecord, decode_job_record, decode_round_record
from protocol.leaves import LeafKind, decode_leaf
from protocol.messages import ContributionReport, EnrolmentRequest, StrikeVote


@dataclass(frozen=True)
class LoggedStrike:
    index: int
    device: str
    vote: StrikeVote


@dataclass
class LedgerFacts:
    """Every leaf of interest in one ledger file, by kind, with its index."""

    size: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    devices_by_key: dict[str, str] = field(default_factory=dict)
    """Key id (hex) -> device id, from the ENROL leaves (each holds the device's signed EnrolmentRequest)."""
    contributions: list[tuple[int, str, ContributionReport]] = field(default_factory=list)
    """(leaf index, device, report) of every CONTRIBUTION leaf."""
    jobs: list[tuple[int, JobLogRecord]] = field(default_factory=list)
    rounds: list[tuple[int, RoundLogRecord]] = field(default_factory=list)
    settlements: list[tuple[int, SplitRecord]] = field(default_factory=list)
    royalties: list[tuple[int, SplitRecord]] = field(default_factory=list)
    strikes: list[LoggedStrike] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> LedgerFacts:
        facts = cls()
        if not path.exists():
            return facts
        with LedgerReader.open_existing(path) as reader:
            facts.size = reader.size
            for index, data in reader.leaves(0, reader.size):
                leaf = decode_leaf(data)
                facts._add(index, leaf.kind, leaf.signed)
        return facts

    def _add(self, index: int, kind: LeafKind, signed: bytes) -> None:
        self.kinds[kind.name] += 1
        if kind is LeafKind.ENROL:
            _, payload, _ = peek_envelope(signed)
            request = EnrolmentRequest.model_validate_json(payload)
            self.devices_by_key[VerifierKey.parse(request.device_key).key_id.hex()] = request.device
        elif kind is LeafKind.CONTRIBUTION:
            report = ContributionReport.model_validate_json(peek_envelope(signed)[1])
            self.contributions.append((index, self._signer(signed), report))
        elif kind is LeafKind.JOB:
            self.jobs.append((index, decode_job_record(signed)))
        elif kind is LeafKind.ROUND:
            self.rounds.append((index, decode_round_record(signed)))
        elif kind is LeafKind.SETTLEMENT:
            self.settlements.append((index, decode_record(signed)))
        elif kind is LeafKind.ROYALTY:
            self.royalties.append((index, decode_record(signed)))
        elif kind is LeafKind.STRIKE:
            vote = StrikeVote.model_validate(json.loads(peek_envelope(signed)[1]))
            self.strikes.append(LoggedStrike(index, self._signer(signed), vote))

    def _signer(self, signed: bytes) -> str:
        """The device whose key signed an envelope (the ledger logs only envelopes ingest verified)."""
        key_ids = peek_envelope(signed)[2]
        return self.devices_by_key.get(key_ids[0], f"key {key_ids[0]}")

    def job(self, job_id: str) -> JobLogRecord | None:
        return next((record for _, record in self.jobs if record.job_id == job_id), None)

    def contributions_of(self, run_id: int) -> Counter[str]:
        """Device -> contribution reports logged for the Flower run `run_id`."""
        return Counter(device for _, device, report in self.contributions if report.run_id == run_id)

    def captured_updates(self, job_id: str) -> int:
        """Updates the job's ROUND leaves record: one contribution report is owed for each."""
        return sum(len(record.updates) for _, record in self.rounds if record.job_id == job_id)
