"""`GET /v1/member/knob-price?knob_milli=N`: what a member's knob means under the MID's current policy.

The agent's `midgate agent knob` shows it, so the one number a member sets comes with the price it yields and the
range the knob spans; the price itself is computed here alone (coordinator.royalties.policy.reservation_price), the
same function quotes use. Public: the policy is no secret, and the answer names no member.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import Response

from coordinator.http_refusals import refusal
from coordinator.royalties.policy import KNOB_MAX_MILLI, KNOB_MIN_MILLI, RoyaltyPolicy, reservation_price
from protocol.errors import MalformedError, ProtocolError, Reason
from protocol.ledger_api import KnobPrice, PurposeList

KNOB_PRICE_PATH = "/v1/member/knob-price"
PURPOSES_PATH = "/v1/member/purposes"


def knob_price(policy: RoyaltyPolicy, currency: str, knob_milli: int) -> KnobPrice:
    """The price at `knob_milli` and the knob's range under `policy`; PolicyViolationError for a knob out of range."""
    return KnobPrice(
        policy_version=policy.version,
        currency=currency,
        knob_milli=knob_milli,
        price_minor=reservation_price(knob_milli, policy.knob),
        lowest_minor=reservation_price(KNOB_MIN_MILLI, policy.knob),
        highest_minor=reservation_price(KNOB_MAX_MILLI, policy.knob),
        base_price_minor=reservation_price(0, policy.knob),
    )


def knob_router(
    policy: Callable[[], RoyaltyPolicy],
    currency: str,
    on_refusal: Callable[[Reason], None] = lambda reason: None,
    purposes: Callable[[], PurposeList] | None = None,
) -> APIRouter:
    """`policy()`: the money policy in force now (serve: the latest POLICY leaf); `purposes()`: the vocabulary of
    the policy in force, served on PURPOSES_PATH for members' consent (absent: no such route)."""
    router = APIRouter()

    if purposes is not None:
        listed = purposes

        @router.get(PURPOSES_PATH)
        def vocabulary() -> Response:
            return Response(listed().canonical_json(), media_type="application/json")

    @router.get(KNOB_PRICE_PATH)
    def price(knob_milli: str = "0") -> Response:
        try:
            digits = knob_milli.removeprefix("-")  # one sign; ASCII digits only (int() refuses "¹", isdigit() not)
            if not (digits.isascii() and digits.isdigit() and len(knob_milli) <= 6):
                raise MalformedError("knob_milli is an integer in [-1000, 1000]", found=knob_milli[:20])
            answer = knob_price(policy(), currency, int(knob_milli))
        except ProtocolError as error:
            return refusal(error, on_refusal)
        return Response(answer.canonical_json(), media_type="application/json")

    return router


__all__ = ["KNOB_PRICE_PATH", "PURPOSES_PATH", "knob_price", "knob_router"]
