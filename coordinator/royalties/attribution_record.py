"""Turn a job's attribution into the ModelAttribution that settlement and royalties split by: from the valuation's
own account (in process), or from the job's JOB leaf (what `serve` settles a logged job by)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from coordinator.royalties.policy import RoyaltyPolicy, check_knob
from coordinator.royalties.settlement import MemberAttribution, ModelAttribution
from protocol.errors import MalformedError
from protocol.job_log import JobLogRecord

if TYPE_CHECKING:  # the account's module imports numpy, which settling a logged job does not need
    from coordinator.attribution.history import AttributionAccount

DEFAULT_KNOB_MILLI = 0
"""The knob of a member the MID holds no knob for: the base price. Members cannot send their knob yet (README)."""


def model_attribution(
    account: AttributionAccount,
    knobs_milli: Mapping[str, int],
    *,
    job_id: str,
    model_version: str,
    policy: RoyaltyPolicy,
) -> ModelAttribution:
    """Freeze the account with each member's knob at job time. Every valued member needs a knob."""
    values = [
        _Value(
            member,
            value_units,
            account.member_rounds.get(member, 0),
            account.excluded_rounds.get(member, 0),
            tuple(sorted(account.screens.get(member, set()))),
        )
        for member, value_units in account.attribution_vector().items()
    ]
    return _frozen(values, knobs_milli, job_id=job_id, model_version=model_version, policy=policy)


def job_attribution(job: JobLogRecord, knobs_milli: Mapping[str, int], policy: RoyaltyPolicy) -> ModelAttribution:
    """The attribution a logged, completed job's settlement splits by: each member's value over the job (summed over
    its devices in the JOB leaf), at its knob (the base price for a member without one)."""
    if job.status != "completed" or job.model_version is None:
        raise MalformedError("only a completed job has a model to settle", job=job.job_id, status=job.status)
    knobs = {m.member: knobs_milli.get(m.member, DEFAULT_KNOB_MILLI) for m in job.attribution}
    values = [_Value(m.member, m.value_units, m.rounds, m.excluded_rounds, m.screens) for m in job.attribution]
    return _frozen(values, knobs, job_id=job.job_id, model_version=job.model_version, policy=policy)


class _Value(NamedTuple):
    member: str
    value_units: int
    rounds: int
    excluded_rounds: int
    screens: Sequence[str]


def _frozen(
    values: Iterable[_Value],
    knobs_milli: Mapping[str, int],
    *,
    job_id: str,
    model_version: str,
    policy: RoyaltyPolicy,
) -> ModelAttribution:
    values = sorted(values, key=lambda v: v.member)
    missing = sorted({v.member for v in values} - set(knobs_milli))
    if missing:
        raise MalformedError("no knob for valued members", missing=missing[:10], count=len(missing))
    members = []
    for value in values:
        check_knob(knobs_milli[value.member])
        members.append(
            MemberAttribution(
                member=value.member,
                value_units=value.value_units,
                knob_milli=knobs_milli[value.member],
                rounds=value.rounds,
                excluded_rounds=value.excluded_rounds,
                screens=list(value.screens),
            )
        )
    return ModelAttribution(job_id=job_id, model_version=model_version, policy=policy, members=members)
