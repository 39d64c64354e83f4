"""The MID's Refusal notices: a report refused for good leaves the outbox (kept, with the reason) instead of being
resent forever (docs/messaging.md, "Refusals").

A notice is believed only if the MID key signed it, it names this device's key, and it names the SHA-256 of the exact
envelope the outbox holds under its seq: a notice can only settle the one report it speaks of.
"""

from __future__ import annotations

import logging

from edge.agent.membership import Membership
from edge.agent.outbox import Outbox
from protocol.envelope import decode, open_envelope
from protocol.errors import MalformedError, ProtocolError, TopicMismatchError
from protocol.messages import Refusal

log = logging.getLogger("midgate.agent")

MAX_REFUSAL_BYTES = 8 * 1024


def open_refusal(payload: bytes, membership: Membership) -> Refusal:
    """Verify a Refusal: size, MID signature, addressed to this device's key. Raises a ProtocolError otherwise."""
    if len(payload) > MAX_REFUSAL_BYTES:
        raise MalformedError("refusal too large", limit=MAX_REFUSAL_BYTES, found=len(payload))
    mid_key = membership.mid_key
    refusal = decode(open_envelope(payload, {mid_key.key_id.hex(): mid_key}, Refusal.PAYLOAD_TYPE), Refusal)
    own = membership.key.key_id.hex()
    if refusal.device_key_id != own:
        raise TopicMismatchError("refusal names another device key", expected=own, found=refusal.device_key_id)
    return refusal


def settle_refusal(outbox: Outbox, membership: Membership, payload: bytes, now_ms: int) -> bool:
    """Apply one Refusal notice to the outbox; True when a pending report moved to `refused`. Never raises on input."""
    try:
        refusal = open_refusal(payload, membership)
    except ProtocolError as exc:
        log.warning("refusal notice ignored", extra={"reason": str(exc.reason), "error": str(exc)})
        return False
    moved = outbox.refuse(refusal.seq, refusal.envelope_sha256, refusal.reason, refusal.detail, now_ms)
    if moved:
        log.warning(
            "report refused by the MID; kept, not resent",
            extra={"mid": membership.mid, "seq": refusal.seq, "reason": refusal.reason, "detail": refusal.detail},
        )
    else:
        # A repeated notice (the report is already settled) or one for other bytes than those held under this seq.
        log.info("refusal for no pending report", extra={"seq": refusal.seq, "reason": refusal.reason})
    return moved
