"""Royalties: knob prices, quotes, exact settlement and lifetime royalty splits, member statements (issue 7).

Names are imported lazily (PEP 562): `midgate ledger` mounts a command from this package, and every `midgate`
invocation (the member agent's too) must not pay for numpy and the valuation code it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.royalties.attribution_record import model_attribution
    from coordinator.royalties.policy import (
        MAX_FEE_BPS,
        KnobPolicy,
        RoyaltyPolicy,
        check_knob,
        reservation_price,
    )
    from coordinator.royalties.quote import Quote, quote_job
    from coordinator.royalties.settlement import (
        MemberAttribution,
        MemberPayout,
        ModelAttribution,
        SplitInputs,
        SplitRecord,
        compute_split,
        decode_record,
        encode_record,
        largest_remainder,
        recompute_settlement,
        record_hash,
        settle_job,
        split_royalty,
        verify_settlement,
    )
    from coordinator.royalties.statement import MemberStatement, StatementLine, member_statement, render_statement

_SOURCES = {
    "KnobPolicy": "coordinator.royalties.policy",
    "MAX_FEE_BPS": "coordinator.royalties.policy",
    "MemberAttribution": "coordinator.royalties.settlement",
    "MemberPayout": "coordinator.royalties.settlement",
    "MemberStatement": "coordinator.royalties.statement",
    "ModelAttribution": "coordinator.royalties.settlement",
    "Quote": "coordinator.royalties.quote",
    "RoyaltyPolicy": "coordinator.royalties.policy",
    "SplitInputs": "coordinator.royalties.settlement",
    "SplitRecord": "coordinator.royalties.settlement",
    "StatementLine": "coordinator.royalties.statement",
    "check_knob": "coordinator.royalties.policy",
    "compute_split": "coordinator.royalties.settlement",
    "decode_record": "coordinator.royalties.settlement",
    "encode_record": "coordinator.royalties.settlement",
    "largest_remainder": "coordinator.royalties.settlement",
    "member_statement": "coordinator.royalties.statement",
    "model_attribution": "coordinator.royalties.attribution_record",
    "quote_job": "coordinator.royalties.quote",
    "recompute_settlement": "coordinator.royalties.settlement",
    "record_hash": "coordinator.royalties.settlement",
    "render_statement": "coordinator.royalties.statement",
    "reservation_price": "coordinator.royalties.policy",
    "settle_job": "coordinator.royalties.settlement",
    "split_royalty": "coordinator.royalties.settlement",
    "verify_settlement": "coordinator.royalties.settlement",
}

__all__ = [
    "MAX_FEE_BPS",
    "KnobPolicy",
    "MemberAttribution",
    "MemberPayout",
    "MemberStatement",
    "ModelAttribution",
    "Quote",
    "RoyaltyPolicy",
    "SplitInputs",
    "SplitRecord",
    "StatementLine",
    "check_knob",
    "compute_split",
    "decode_record",
    "encode_record",
    "largest_remainder",
    "member_statement",
    "model_attribution",
    "quote_job",
    "recompute_settlement",
    "record_hash",
    "render_statement",
    "reservation_price",
    "settle_job",
    "split_royalty",
    "verify_settlement",
]


def __getattr__(name: str) -> Any:
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
