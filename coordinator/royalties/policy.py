"""MID royalty policy: the fee cap and how a member's knob becomes a reservation price.

The fiduciary cap is structural: a policy with a fee above 30 % cannot be constructed, so a coordinator config that
asks for one is refused at load time with PolicyViolationError. All quantities are integers (basis points,
milli-units, minor units) so that every computation downstream is exact and reproducible.
"""

from __future__ import annotations

import decimal
from decimal import Decimal
from typing import Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    model_serializer,
    model_validator,
)

from protocol.errors import PolicyViolationError

MAX_FEE_BPS = 3000
BPS = 10_000
KNOB_MIN_MILLI = -1000
KNOB_MAX_MILLI = 1000

# Decimal exp() is correctly rounded, so a price is the same on every machine (float exp is not guaranteed to be).
_PRICE_CONTEXT = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)


class KnobPolicy(BaseModel):
    """price = clamp(round_half_even(base * exp(alpha * knob)), min, max), knob in [-1, +1].

    - base_price_minor: the price of a member at knob 0, in minor units per job.
    - alpha_milli (693 ~ ln 2): knob +1 asks about 2x base, knob -1 about 0.5x.
    - min_price_minor / max_price_minor: the MID bounds every price is clamped to.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    base_price_minor: int = Field(ge=0)
    alpha_milli: int = Field(default=693, ge=0, le=5000)
    min_price_minor: int = Field(ge=0)
    max_price_minor: int = Field(ge=0)

    @model_validator(mode="after")
    def _bounds_hold_base(self) -> Self:
        if not self.min_price_minor <= self.base_price_minor <= self.max_price_minor:
            raise PolicyViolationError(
                "knob bounds must contain the base price",
                min_price_minor=self.min_price_minor,
                base_price_minor=self.base_price_minor,
                max_price_minor=self.max_price_minor,
            )
        return self


class RoyaltyPolicy(BaseModel):
    """One version of the MID's money policy; every settlement record carries the version it was computed under.

    - version: increases with every policy change (changes apply to future jobs only).
    - fee_bps: the MID fee in basis points of each payment, at most 3000 (30 %).
    - knob: how knobs become prices.
    - majority_excluded_earns_nothing (False): a member excluded by any screen in more than half of a job's rounds
      earns nothing from it even if its other rounds were valued positively. The rule before issue 17; it also
      takes away the pay of an honest member a consensus screen excluded for being different.
    - data_free_earns_nothing (True): a member a data-free proof excluded (coordinator.attribution.screens
      DATA_FREE_PROOFS: its update was provably not trained from the model on data) in more than half of a job's
      rounds earns nothing from it; every other member keeps the value of the rounds where it was admitted.

    A stored record without `data_free_earns_nothing` was computed before the field existed, under False: decoding
    such a record (context {"stored": True}, as settlement.decode_record passes) reads it as False, and False is
    left out of the encoding, so those records keep their bytes.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    version: int = Field(ge=1)
    fee_bps: int = Field(ge=0)
    knob: KnobPolicy
    majority_excluded_earns_nothing: bool = False
    data_free_earns_nothing: bool = True
    royalties_continue: bool = True
    leave_notice_days: int = Field(default=0, ge=0, le=365)

    @model_validator(mode="before")
    @classmethod
    def _stored_before_the_data_free_rule(cls, data: object, info: ValidationInfo) -> object:
        stored = isinstance(info.context, dict) and info.context.get("stored") is True
        if stored and isinstance(data, dict) and "data_free_earns_nothing" not in data:
            return {**data, "data_free_earns_nothing": False}
        return data

    @model_serializer(mode="wrap")
    def _without_the_rule_when_off(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> object:
        dumped = handler(self)
        if isinstance(dumped, dict) and not self.data_free_earns_nothing:
            dumped.pop("data_free_earns_nothing", None)
        # Leave terms at their defaults are left out, so records made before the terms existed keep their bytes
        # (and read back as the defaults, which is what they were computed under).
        if isinstance(dumped, dict) and self.royalties_continue:
            dumped.pop("royalties_continue", None)
        if isinstance(dumped, dict) and self.leave_notice_days == 0:
            dumped.pop("leave_notice_days", None)
        return dumped

    @model_validator(mode="after")
    def _fee_within_cap(self) -> Self:
        if self.fee_bps > MAX_FEE_BPS:
            raise PolicyViolationError(
                "MID fee above the 30 % cap (members keep at least 70 % of every payment)",
                fee_bps=self.fee_bps,
                max_fee_bps=MAX_FEE_BPS,
            )
        return self


def check_knob(knob_milli: int) -> None:
    """A knob is an integer number of milli-units in [-1000, +1000]."""
    if isinstance(knob_milli, bool) or not isinstance(knob_milli, int):
        raise PolicyViolationError("knob must be an integer in milli-units", knob_milli=knob_milli)
    if not KNOB_MIN_MILLI <= knob_milli <= KNOB_MAX_MILLI:
        raise PolicyViolationError(
            "knob outside [-1000, +1000] milli-units", knob_milli=knob_milli, min=KNOB_MIN_MILLI, max=KNOB_MAX_MILLI
        )


def reservation_price(knob_milli: int, policy: KnobPolicy) -> int:
    """The member's price in minor units for one job at this knob setting."""
    check_knob(knob_milli)
    exponent = _PRICE_CONTEXT.divide(Decimal(policy.alpha_milli * knob_milli), Decimal(1_000_000))
    raw = _PRICE_CONTEXT.multiply(Decimal(policy.base_price_minor), _PRICE_CONTEXT.exp(exponent))
    price = int(raw.to_integral_value(rounding=decimal.ROUND_HALF_EVEN))
    return min(max(price, policy.min_price_minor), policy.max_price_minor)
