"""A membership's consent as an ISO/IEC TS 27560 consent record (`midgate agent consent show --format 27560`).

A rendering of what the member's last signed ConsentPolicy says (edge/agent/controls/state.py keeps it), in the
record fields TS 27560 names: an identifier, the data subject (the member's pseudonymous id at this MID, never a
name shared with another MID), the controller (the MID), the purposes with their W3C DPV concepts (from the MID's
published vocabulary), the processing and its recipients' exclusions, timestamps and a status. The record's
identifier names the signed ConsentPolicy (`consent-{ms}`, as the outbox and the MID's ledger log it); a member who
never changed its consent has no signed record, so its status is `default` and every purpose of the vocabulary is
given.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from edge.agent.controls.state import MemberState
from protocol.ledger_api import PurposeTerm

SCHEMA = "ISO/IEC TS 27560:2023 consent record (midgate rendering v1)"
PROCESSING = ("dpv:Collect", "dpv:Use", "dpv:Train")
"""What a job does with the member's data: collected on the device, used there to train the buyer's model (only
model updates leave the device)."""


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def consent_record(
    mid: str, member: str, device: str, state: MemberState, vocabulary: Sequence[PurposeTerm]
) -> dict[str, object]:
    """The TS 27560 record of `state` at `mid`; `vocabulary`: the MID's purposes in force (GET /v1/member/purposes).
    A purpose the member allows that the vocabulary no longer lists is kept with `dpv` None."""
    by_code = {p.code: p for p in vocabulary}
    allowed = [p.code for p in vocabulary] if state.allowed_purposes is None else list(state.allowed_purposes)
    purposes = [
        {
            "code": code,
            "dpv": by_code[code].dpv if code in by_code else None,
            "label": by_code[code].label if code in by_code else None,
        }
        for code in allowed
    ]
    if state.left_ms is not None:
        status = "withdrawn"
    elif state.consent_ms is None:
        status = "default"
    else:
        status = "given"
    return {
        "schema": SCHEMA,
        "identifier": f"consent-{state.consent_ms}" if state.consent_ms is not None else None,
        "data_subject": {"id": member, "id_type": "pseudonymous member id at this controller", "device": device},
        "controller": {"id": mid},
        "purposes": purposes,
        "processing": list(PROCESSING),
        "recipients_excluded": list(state.denied_buyers),
        # TS 27560's personal data categories, per task: the kinds of sensor whose data each listed task may use
        # (a task not listed may use every sensor that fits its inputs).
        "data_sources_per_task": {t.task_id: list(t.sensors) for t in state.task_sensors},
        "timestamps": {
            "given": _iso(state.consent_ms) if state.consent_ms is not None else None,
            "withdrawn": _iso(state.left_ms) if state.left_ms is not None else None,
        },
        "status": status,
        "evidence": "the member-signed ConsentPolicy logged in the controller's ledger (leaf kind consent)"
        if state.consent_ms is not None
        else None,
    }


__all__ = ["PROCESSING", "SCHEMA", "consent_record"]
