"""Typed ledger leaves: what the log records, byte for byte.

Every leaf holds the signed bytes it records *verbatim* (a device's DSSE envelope for a contribution, a member's
signed strike, a coordinator-signed statement for a settlement), so any member can re-verify the signatures inside
the log without trusting the coordinator's parsing. The encoding is unambiguous and has no optional parts:

    leaf = version (1 byte, 0x01) || kind (1 byte) || u32 big-endian length of signed || signed

Nothing may follow `signed`; a different version byte is a different format. The RFC 9162 leaf hash is taken over
these exact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from protocol.errors import MalformedError, TooLargeError

LEAF_VERSION = 0x01
MAX_SIGNED_SIZE = 1 << 20
_HEADER_SIZE = 6


class LeafKind(IntEnum):
    """What a leaf records. Values are part of the log format: append new kinds, never renumber."""

    ENROL = 1
    KEY_REVOKE = 2
    POLICY = 3
    JOB = 4
    CONTRIBUTION = 5
    ROUND = 6
    SETTLEMENT = 7
    ROYALTY = 8
    STRIKE = 9
    ESCROW = 10
    ESCROW_RELEASE = 11
    REFUND = 12
    LEAVE = 13
    """A member's signed LeaveNotice."""
    KNOB = 14
    """A member's signed KnobUpdate."""
    CONSENT = 15
    """A member's signed ConsentPolicy."""
    STRIKE_QUORUM = 16
    """A data strike came into force at the MID's quorum, or ended (protocol.strike_quorum)."""


@dataclass(frozen=True)
class Leaf:
    """One log entry: its kind and the exact signed bytes it records."""

    kind: LeafKind
    signed: bytes

    def __post_init__(self) -> None:
        if len(self.signed) > MAX_SIGNED_SIZE:
            raise TooLargeError("leaf content too large", limit=MAX_SIGNED_SIZE, found=len(self.signed))

    def encode(self) -> bytes:
        return bytes([LEAF_VERSION, self.kind]) + len(self.signed).to_bytes(4, "big") + self.signed


def decode_leaf(data: bytes) -> Leaf:
    """Parse leaf bytes; rejects unknown versions and kinds, wrong lengths and trailing bytes."""
    if len(data) > MAX_SIGNED_SIZE + _HEADER_SIZE:
        raise TooLargeError("leaf too large", limit=MAX_SIGNED_SIZE + _HEADER_SIZE, found=len(data))
    if len(data) < _HEADER_SIZE:
        raise MalformedError("leaf shorter than its header", expected=_HEADER_SIZE, found=len(data))
    if data[0] != LEAF_VERSION:
        raise MalformedError("unknown leaf version", expected=LEAF_VERSION, found=data[0])
    try:
        kind = LeafKind(data[1])
    except ValueError as exc:
        raise MalformedError("unknown leaf kind", found=data[1]) from exc
    length = int.from_bytes(data[2:_HEADER_SIZE], "big")
    if length != len(data) - _HEADER_SIZE:
        raise MalformedError("leaf length field does not match", expected=len(data) - _HEADER_SIZE, found=length)
    return Leaf(kind, bytes(data[_HEADER_SIZE:]))
