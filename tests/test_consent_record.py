"""`agent consent show --format 27560`: the membership's consent as an ISO/IEC TS 27560 consent record."""

from __future__ import annotations

import json

from edge.agent.consent_record import PROCESSING, consent_record
from edge.agent.controls.state import MemberState
from protocol.ledger_api import PurposeTerm

VOCABULARY = (
    PurposeTerm(code="research", dpv="dpv:ResearchAndDevelopment", label="Research and development"),
    PurposeTerm(code="ads", dpv="dpv:Advertising", label="Advertising"),
)
GIVEN_MS = 1_796_000_000_123


def test_a_member_who_never_chose_has_a_default_record_with_every_purpose_of_the_vocabulary() -> None:
    record = consent_record("riverside", "ann", "d-1", MemberState(), VOCABULARY)
    assert record["status"] == "default" and record["identifier"] is None and record["evidence"] is None
    assert [p["code"] for p in record["purposes"]] == ["research", "ads"]  # type: ignore[attr-defined]
    assert record["data_subject"] == {
        "id": "ann",
        "id_type": "pseudonymous member id at this controller",
        "device": "d-1",
    }
    assert record["controller"] == {"id": "riverside"}
    assert record["timestamps"] == {"given": None, "withdrawn": None}


def test_a_signed_consent_names_its_logged_policy_its_dpv_purposes_and_the_buyers_it_denies() -> None:
    state = MemberState(allowed_purposes=("ads", "retired"), denied_buyers=("acme",), consent_ms=GIVEN_MS)
    record = consent_record("riverside", "ann", "d-1", state, VOCABULARY)
    assert record["identifier"] == f"consent-{GIVEN_MS}" and record["status"] == "given"
    assert record["purposes"] == [
        {"code": "ads", "dpv": "dpv:Advertising", "label": "Advertising"},
        {"code": "retired", "dpv": None, "label": None},  # the MID no longer lists it: kept, without a concept
    ]
    assert record["recipients_excluded"] == ["acme"] and record["processing"] == list(PROCESSING)
    assert record["timestamps"] == {"given": "2026-11-30T00:53:20.123Z", "withdrawn": None}
    json.dumps(record)  # what the command prints


def test_a_member_who_left_has_its_consent_withdrawn() -> None:
    state = MemberState(allowed_purposes=("ads",), consent_ms=GIVEN_MS, left_ms=GIVEN_MS + 1000)
    record = consent_record("riverside", "ann", "d-1", state, VOCABULARY)
    assert record["status"] == "withdrawn"
    assert record["timestamps"] == {"given": "2026-11-30T00:53:20.123Z", "withdrawn": "2026-11-30T00:53:21.123Z"}
