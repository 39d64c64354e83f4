"""Royalties: knob prices, quotes, exact settlement and lifetime royalty splits, member statements (issue 7)."""

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
