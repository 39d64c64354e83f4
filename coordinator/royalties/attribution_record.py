"""Turn a job's accumulated attribution into the ModelAttribution that settlement and royalties split by."""

from __future__ import annotations

from collections.abc import Mapping

from coordinator.attribution.history import AttributionAccount
from coordinator.royalties.policy import RoyaltyPolicy, check_knob
from coordinator.royalties.settlement import MemberAttribution, ModelAttribution
from protocol.errors import MalformedError


def model_attribution(
    account: AttributionAccount,
    knobs_milli: Mapping[str, int],
    *,
    job_id: str,
    model_version: str,
    policy: RoyaltyPolicy,
) -> ModelAttribution:
    """Freeze the account with each member's knob at job time. Every valued member needs a knob."""
    vector = account.attribution_vector()
    missing = sorted(set(vector) - set(knobs_milli))
    if missing:
        raise MalformedError("no knob for valued members", missing=missing[:10], count=len(missing))
    members = []
    for member, value_units in vector.items():
        check_knob(knobs_milli[member])
        members.append(
            MemberAttribution(
                member=member,
                value_units=value_units,
                knob_milli=knobs_milli[member],
                rounds=account.member_rounds.get(member, 0),
                excluded_rounds=account.excluded_rounds.get(member, 0),
                screens=sorted(account.screens.get(member, set())),
            )
        )
    return ModelAttribution(job_id=job_id, model_version=model_version, policy=policy, members=members)
