"""Members' logged choices kept where job start, quotes and the operator's commands read them (the registry).

The pipeline's commit hands every logged LeaveNotice, KnobUpdate and ConsentPolicy here right after the ledger
append, before the dedup index moves, so a crash in between is caught up from the ledger at the next start (as strike
votes are: coordinator/ingest/presence.py). Each write is idempotent: a departure already recorded revokes nothing
more, and a knob or consent is kept only when its leaf is the member's latest.

A departure revokes every device key of the member (ingest refuses them from the next batch, `serve` logs a
key-revoke leaf for each) and the caller rewrites the broker's logins without them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from coordinator.registry.member_choices import ConsentRecord, KnobSetting
from coordinator.registry.store import Registry
from protocol.envelope import parse_unverified_payload, peek_envelope
from protocol.leaves import LeafKind
from protocol.messages import ConsentPolicy, KnobUpdate, LeaveNotice

log = logging.getLogger("midgate.ingest")

MEMBER_KINDS = frozenset({LeafKind.LEAVE, LeafKind.KNOB, LeafKind.CONSENT})


@dataclass(frozen=True)
class LoggedChoice:
    leaf_index: int
    kind: LeafKind
    device_id: str
    envelope: bytes
    """The device-signed envelope as logged (verified before it was)."""


def record_member_choices(registry: Registry, logged: list[LoggedChoice], now_ms: int) -> list[str]:
    """Keep each logged choice in the registry, in log order; returns the devices revoked by departures."""
    revoked: list[str] = []
    for choice in sorted(logged, key=lambda c: c.leaf_index):
        device = registry.device(choice.device_id)
        if device is None:
            continue
        payload_type, payload, _ = peek_envelope(choice.envelope)
        if choice.kind is LeafKind.LEAVE:
            parse_unverified_payload(payload_type, payload, LeaveNotice)
            now_revoked = registry.record_departure(device.member_id, choice.leaf_index, now_ms)
            if now_revoked:
                log.info(
                    "member left: device keys revoked",
                    extra={"member": device.member_id, "leaf_index": choice.leaf_index, "devices": str(now_revoked)},
                )
            revoked += now_revoked
        elif choice.kind is LeafKind.KNOB:
            knob = parse_unverified_payload(payload_type, payload, KnobUpdate)
            registry.record_knob(KnobSetting(device.member_id, knob.bias_milli, choice.leaf_index, knob.device_time_ms))
            log.info(
                "member knob set",
                extra={"member": device.member_id, "bias_milli": knob.bias_milli, "leaf_index": choice.leaf_index},
            )
        elif choice.kind is LeafKind.CONSENT:
            consent = parse_unverified_payload(payload_type, payload, ConsentPolicy)
            registry.record_consent(
                ConsentRecord(
                    device.member_id,
                    None if consent.any_purpose else consent.allowed_purposes,
                    consent.denied_buyers,
                    choice.leaf_index,
                    consent.task_sensors,
                )
            )
            log.info(
                "member consent set",
                extra={
                    "member": device.member_id,
                    "allowed_purposes": "any" if consent.any_purpose else ",".join(consent.allowed_purposes),
                    "denied_buyers": ",".join(consent.denied_buyers),
                    "task_sensors": ";".join(f"{t.task_id}:{','.join(t.sensors)}" for t in consent.task_sensors),
                    "leaf_index": choice.leaf_index,
                },
            )
    return revoked


__all__ = ["MEMBER_KINDS", "LoggedChoice", "record_member_choices"]
