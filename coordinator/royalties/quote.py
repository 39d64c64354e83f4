"""The price a buyer is quoted for a job: the selected members' reservation prices plus the MID fee."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from coordinator.royalties.policy import BPS, RoyaltyPolicy, reservation_price


class Quote(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    policy_version: int
    member_prices: dict[str, int]
    members_minor: int
    fee_minor: int
    total_minor: int


def quote_job(knobs_milli: Mapping[str, int], policy: RoyaltyPolicy) -> Quote:
    """Total = ceil(members / (1 - fee)), so that settling the total under the same policy leaves a member pool of
    at least the sum of the members' prices (the fee is floored at settlement)."""
    prices = {member: reservation_price(knob, policy.knob) for member, knob in sorted(knobs_milli.items())}
    members = sum(prices.values())
    total = -(-members * BPS // (BPS - policy.fee_bps))
    return Quote(
        policy_version=policy.version,
        member_prices=prices,
        members_minor=members,
        fee_minor=total - members,
        total_minor=total,
    )
