"""The ledger's STRIKE_QUORUM leaves: when a data strike reached its quorum at the MID, and when it ended.

Members' StrikeVotes are logged one by one (`strike` leaves); whether they add up to a strike the MID honours depends
on the policy's `[strikes]` quorum and on who is a member at the time, which a member cannot see from its own vote.
So `coordinator serve`, the log's one writer, appends a STRIKE_QUORUM leaf each time a target's strike comes into
force (`in_force` true) or ends (`in_force` false). Its body is the record's canonical JSON, committed to by the MID's
signed checkpoint like a JOB leaf. It names the `strike` leaves of the votes it counted, so anyone holding the log
can check each one with `check_counted_votes`: a logged vote, not a withdrawal, against a target that covers this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal, Self

from pydantic import Field, ValidationError, model_validator

from protocol.envelope import parse_unverified_payload, peek_envelope
from protocol.errors import MalformedError, TooLargeError
from protocol.leaves import MAX_SIGNED_SIZE, LeafKind, decode_leaf
from protocol.messages import U64, CanonicalModel, Ident, StrikeVote, TimeMs


class StrikeQuorumRecord(CanonicalModel):
    """The body of a STRIKE_QUORUM leaf: a target's strike came into force (`in_force`) or ended."""

    SCHEMA: ClassVar[str] = "midgate.strike-quorum.v1"
    schema_id: Literal["midgate.strike-quorum.v1"] = "midgate.strike-quorum.v1"
    target_buyer: Ident | None
    target_purpose: Ident | None
    in_force: bool
    strikers: int = Field(ge=0)
    """Members striking against the target when the change was seen (each member once)."""
    needed: int = Field(ge=1)
    """The quorum: members needed, from the policy version `policy_version` and `active_members`."""
    active_members: int = Field(ge=0)
    policy_version: int = Field(ge=0)
    """The POLICY leaf version whose `[strikes]` applied (0: the configured policy, before any POLICY leaf)."""
    running_jobs: Literal["finish", "stop"]
    """What the policy says jobs of the target already running do (`[strikes] running_jobs`)."""
    at_ms: TimeMs
    counted_votes: tuple[U64, ...] = Field(max_length=100_000)
    """Leaf indices of the `strike` leaves of the votes in force that cover the target, ascending."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.target_buyer is None and self.target_purpose is None:
            raise ValueError("a strike target names a buyer, a purpose or both")
        if list(self.counted_votes) != sorted(set(self.counted_votes)):
            raise ValueError("counted_votes must be ascending and unique")
        if self.in_force != (self.strikers >= self.needed):
            raise ValueError("in_force must say whether strikers reach needed")
        return self

    def target_text(self) -> str:
        named = [("buyer", self.target_buyer), ("purpose", self.target_purpose)]
        return ", ".join(f"{what} {value}" for what, value in named if value is not None)


def decode_strike_quorum(data: bytes) -> StrikeQuorumRecord:
    """A STRIKE_QUORUM leaf's body; size first, then the strict schema, then the canonical form."""
    if len(data) > MAX_SIGNED_SIZE:
        raise TooLargeError("strike quorum record too large", limit=MAX_SIGNED_SIZE, found=len(data))
    try:
        record = StrikeQuorumRecord.model_validate_json(data)
    except ValidationError as error:
        raise MalformedError(
            "not a strike quorum record", errors=error.error_count(), first=error.errors()[0]["msg"]
        ) from None
    if record.canonical_json() != data:
        raise MalformedError("strike quorum record is not in canonical encoding", size=len(data))
    return record


def check_counted_votes(record: StrikeQuorumRecord, leaves: Mapping[int, bytes]) -> None:
    """Every vote the record counts is, in `leaves` (leaf index -> leaf bytes from the log), a `strike` leaf holding
    a StrikeVote that is not a withdrawal and whose target covers the record's (a vote against a buyer covers that
    buyer for any purpose). MalformedError names the first index that is not. The signatures inside are checked by
    whoever audits the votes' devices; this checks what the record claims about them."""
    for index in record.counted_votes:
        if index not in leaves:
            raise MalformedError("a counted vote is not in the leaves given", leaf_index=index)
        leaf = decode_leaf(leaves[index])
        if leaf.kind is not LeafKind.STRIKE:
            raise MalformedError("a counted vote is not a strike leaf", leaf_index=index, kind=leaf.kind.name)
        payload_type, payload, _ = peek_envelope(leaf.signed)
        vote = parse_unverified_payload(payload_type, payload, StrikeVote)
        covers = vote.target_buyer in (None, record.target_buyer) and vote.target_purpose in (
            None,
            record.target_purpose,
        )
        if vote.withdraw or not covers:
            raise MalformedError("a counted vote does not strike against this target", leaf_index=index)


__all__ = ["StrikeQuorumRecord", "check_counted_votes", "decode_strike_quorum"]
