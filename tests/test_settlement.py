"""Settlement and royalty records: exact integer splits, the fee cap, byte-for-byte recomputation, statements."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.royalties import (
    MAX_FEE_BPS,
    KnobPolicy,
    MemberAttribution,
    ModelAttribution,
    RoyaltyPolicy,
    decode_record,
    largest_remainder,
    member_statement,
    quote_job,
    recompute_settlement,
    record_hash,
    render_statement,
    reservation_price,
    settle_job,
    split_royalty,
    verify_settlement,
)
from coordinator.royalties.settlement import DAY_MS, MAX_RECORD_BYTES, DepartedMember
from protocol.errors import MalformedError, PolicyViolationError, Reason, SettlementMismatchError, TooLargeError

KNOB = KnobPolicy(base_price_minor=10_000, alpha_milli=693, min_price_minor=2_000, max_price_minor=50_000)


def policy(fee_bps: int = 2000, version: int = 1) -> RoyaltyPolicy:
    return RoyaltyPolicy(version=version, fee_bps=fee_bps, knob=KNOB)


def attribution(members: list[MemberAttribution], fee_bps: int = 2000) -> ModelAttribution:
    return ModelAttribution(job_id="job-7", model_version="job-7.v1", policy=policy(fee_bps), members=members)


def member(
    name: str, value: int, knob: int = 0, rounds: int = 4, excluded: int = 0, screens: tuple[str, ...] = ()
) -> MemberAttribution:
    return MemberAttribution(
        member=name,
        value_units=value,
        knob_milli=knob,
        rounds=rounds,
        excluded_rounds=excluded,
        screens=sorted(screens),
    )


def settle(attr: ModelAttribution, payment: int, record_id: str = "s-1", created_ms: int = 1_000) -> bytes:
    return settle_job(attr, payment, record_id=record_id, created_ms=created_ms, currency="EUR")


members_strategy = st.lists(
    st.tuples(st.integers(-(10**12), 10**12), st.integers(-1000, 1000), st.integers(0, 5)),
    min_size=1,
    max_size=40,
)
SCREENS = ("data_free", "near_duplicate", "random_direction", "zero_update")


@settings(max_examples=300, deadline=None)
@given(
    payment=st.integers(0, 10**13),
    fee_bps=st.integers(0, MAX_FEE_BPS),
    rows=members_strategy,
    screens=st.lists(st.sets(st.sampled_from(SCREENS)), min_size=40, max_size=40),
)
def test_parts_sum_exactly_to_the_payment(
    payment: int, fee_bps: int, rows: list[tuple[int, int, int]], screens: list[set[str]]
) -> None:
    members = [
        member(f"m{i:03d}", v, k, rounds=4, excluded=e, screens=tuple(screens[i])) for i, (v, k, e) in enumerate(rows)
    ]
    record = decode_record(settle(attribution(members, fee_bps), payment))
    paid = sum(p.amount_minor for p in record.payouts)
    assert record.fee_minor + paid + record.unallocated_minor == payment
    assert record.fee_minor * 10_000 <= payment * fee_bps
    assert record.pool_minor == payment - record.fee_minor
    for row, payout in zip(members, record.payouts, strict=True):
        proven = {"data_free", "zero_update"} & set(row.screens)
        if row.value_units <= 0 or (2 * row.excluded_rounds > row.rounds and proven):
            assert payout.amount_minor == 0
        elif payment * (10_000 - fee_bps) >= 10_000 * sum(max(r.value_units, 0) for r in members) * 10:
            assert payout.amount_minor > 0  # a pool this large leaves no eligible member at 0
    eligible = [p for p in record.payouts if p.weight > 0]
    if eligible:
        assert record.unallocated_minor == 0
        total_weight = sum(p.weight for p in eligible)
        for p in eligible:
            # Largest remainder: every part is its exact quota rounded down or up.
            quota_floor = record.pool_minor * p.weight // total_weight
            assert quota_floor <= p.amount_minor <= quota_floor + 1
    else:
        assert record.unallocated_minor == record.pool_minor


@settings(max_examples=100, deadline=None)
@given(payment=st.integers(0, 10**12), rows=members_strategy)
def test_recompute_reproduces_the_record_byte_for_byte(payment: int, rows: list[tuple[int, int, int]]) -> None:
    members = [member(f"m{i:03d}", v, k, excluded=e) for i, (v, k, e) in enumerate(rows)]
    record_bytes = settle(attribution(members), payment)
    assert recompute_settlement(record_bytes) == record_bytes
    assert verify_settlement(record_bytes).inputs.payment_minor == payment


def test_largest_remainder_tie_break_is_by_member_id() -> None:
    assert largest_remainder(10, [1, 1, 1], ["c", "a", "b"]) == [3, 4, 3]
    assert largest_remainder(2, [1, 1, 1], ["c", "a", "b"]) == [0, 1, 1]
    assert largest_remainder(7, [0, 5, 0], ["a", "b", "c"]) == [0, 7, 0]


def test_known_split() -> None:
    record = decode_record(settle(attribution([member("a", 3), member("b", 1), member("c", -5)]), 1_001))
    assert record.fee_minor == 200
    amounts = {p.member: (p.amount_minor, p.reason) for p in record.payouts}
    # Pool 801 split 3:1 at equal prices: quotas 600.75 and 200.25, the leftover unit goes to a.
    assert amounts == {"a": (601, "paid"), "b": (200, "paid"), "c": (0, "no_positive_value")}


def test_knob_raises_the_share_of_equal_value() -> None:
    record = decode_record(
        settle(attribution([member("cheap", 100, knob=-1000), member("dear", 100, knob=1000)]), 10**6)
    )
    paid = {p.member: p.amount_minor for p in record.payouts}
    prices = {p.member: p.price_minor for p in record.payouts}
    assert prices == {"cheap": 5_001, "dear": 19_997}
    assert paid["dear"] > 3 * paid["cheap"]


def test_a_member_proven_data_free_in_most_rounds_earns_nothing_and_one_merely_screened_keeps_its_value() -> None:
    members = [
        member("b", 10),
        member("different", 10, rounds=4, excluded=3, screens=("random_direction",)),
        member("once", 10, rounds=4, excluded=1, screens=("zero_update",)),
        member("rider", 10, rounds=4, excluded=3, screens=("data_free",)),
    ]
    record = decode_record(settle(attribution(members), 1_000))
    paid = {p.member: (p.amount_minor, p.reason) for p in record.payouts}
    # The value of the admitted rounds is all "different" has (screened rounds are valued 0): no cliff takes it.
    assert paid == {"rider": (0, "screened"), "different": (267, "paid"), "once": (266, "paid"), "b": (267, "paid")}


def test_the_old_rule_is_a_policy_choice_and_a_record_made_under_it_still_verifies() -> None:
    old_rule = policy().model_copy(update={"majority_excluded_earns_nothing": True, "data_free_earns_nothing": False})
    members = [member("a", 10, rounds=4, excluded=3, screens=("random_direction",)), member("b", 10)]
    record = decode_record(
        settle(ModelAttribution(job_id="job-7", model_version="job-7.v1", policy=old_rule, members=members), 1_000)
    )
    assert {p.member: (p.amount_minor, p.reason) for p in record.payouts} == {"a": (0, "screened"), "b": (800, "paid")}
    # A record as the code before the data-free rule wrote it (no such key in its policy) reproduces byte for byte.
    verified = verify_settlement(LEGACY_RECORD)
    assert verified.inputs.attribution.policy.data_free_earns_nothing is False
    assert recompute_settlement(LEGACY_RECORD) == LEGACY_RECORD
    assert {p.member: p.reason for p in verified.payouts} == {"ann": "paid", "cid": "screened"}


LEGACY_RECORD = (
    b'{"fee_minor":200,"inputs":{"attribution":{"job_id":"job-1","members":[{"excluded_rounds":0,"knob_milli":0,'
    b'"member":"ann","rounds":4,"screens":[],"value_units":7},{"excluded_rounds":3,"knob_milli":0,"member":"cid",'
    b'"rounds":4,"screens":["random_direction"],"value_units":5}],"model_version":"job-1:00","policy":{"fee_bps":2000,'
    b'"knob":{"alpha_milli":693,"base_price_minor":1000,"max_price_minor":100000,"min_price_minor":100},'
    b'"majority_excluded_earns_nothing":true,"version":1}},"created_ms":1,"currency":"EUR","kind":"settlement",'
    b'"payment_minor":1000,"record_id":"settlement-job-1"},"payouts":[{"amount_minor":800,"member":"ann",'
    b'"price_minor":1000,"reason":"paid","weight":7000},{"amount_minor":0,"member":"cid","price_minor":1000,'
    b'"reason":"screened","weight":0}],"pool_minor":800,"schema_id":"midgate.split.v1","unallocated_minor":0}'
)
"""Written by the settlement code of commit d28f8d5 (before issue 17), under its default policy."""


def test_nobody_positive_leaves_the_pool_unallocated() -> None:
    record = decode_record(settle(attribution([member("a", 0), member("b", -3)]), 1_000))
    assert record.unallocated_minor == 800
    assert all(p.amount_minor == 0 for p in record.payouts)


@pytest.mark.parametrize("fee_bps", [3001, 5000, 10_000])
def test_fee_above_the_cap_is_refused(fee_bps: int) -> None:
    with pytest.raises(PolicyViolationError) as raised:
        policy(fee_bps)
    assert raised.value.reason is Reason.POLICY_VIOLATION
    assert raised.value.details == {"fee_bps": fee_bps, "max_fee_bps": MAX_FEE_BPS}


def test_policy_from_config_json_with_a_high_fee_is_refused() -> None:
    text = json.dumps({"version": 2, "fee_bps": 3500, "knob": KNOB.model_dump()})
    with pytest.raises(PolicyViolationError):
        RoyaltyPolicy.model_validate_json(text)
    assert RoyaltyPolicy.model_validate_json(text.replace("3500", "3000")).fee_bps == MAX_FEE_BPS


def test_tampered_payout_is_detected() -> None:
    record_bytes = settle(attribution([member("a", 3), member("b", 1)]), 1_000)
    tampered = record_bytes.replace(b'"amount_minor":600', b'"amount_minor":601').replace(
        b'"amount_minor":200', b'"amount_minor":199'
    )
    assert tampered != record_bytes
    assert decode_record(tampered).payouts[0].amount_minor == 601
    with pytest.raises(SettlementMismatchError) as raised:
        verify_settlement(tampered)
    assert raised.value.details["stored_hash"] == record_hash(tampered)
    assert recompute_settlement(tampered) == record_bytes


def test_non_canonical_or_malformed_bytes_are_refused() -> None:
    record_bytes = settle(attribution([member("a", 3)]), 1_000)
    with pytest.raises(MalformedError):
        decode_record(json.dumps(json.loads(record_bytes), indent=1).encode())
    with pytest.raises(MalformedError):
        decode_record(record_bytes.replace(b'"payment_minor":1000', b'"payment_minor":"1000"'))
    with pytest.raises(MalformedError):
        decode_record(record_bytes[:-1])
    with pytest.raises(TooLargeError):
        decode_record(b" " * (MAX_RECORD_BYTES + 1))


def test_attribution_must_be_sorted_and_unique() -> None:
    with pytest.raises(MalformedError):
        attribution([member("b", 1), member("a", 1)])
    with pytest.raises(MalformedError):
        attribution([member("a", 1), member("a", 2)])


def test_royalty_pays_members_who_left_by_the_stored_vector() -> None:
    model = attribution([member("left-long-ago", 5), member("still-here", 5)])
    record = decode_record(split_royalty(model, 10_000, record_id="r-1", created_ms=5_000, currency="EUR"))
    assert record.inputs.kind == "royalty"
    assert {p.member: p.amount_minor for p in record.payouts} == {"left-long-ago": 4_000, "still-here": 4_000}


def test_royalties_of_a_departed_member_end_after_the_notice_only_when_the_models_policy_says_so() -> None:
    ending = RoyaltyPolicy(version=2, fee_bps=2000, knob=KNOB, royalties_continue=False, leave_notice_days=30)
    members = [member("gone", 5), member("stays", 5)]
    model = ModelAttribution(job_id="job-7", model_version="job-7.v1", policy=ending, members=members)
    left = DepartedMember(member="gone", leave_leaf_index=42, left_ms=1_000)
    elsewhere = DepartedMember(member="not-in-this-model", leave_leaf_index=43, left_ms=1_000)

    def split(created_ms: int, attr: ModelAttribution = model) -> bytes:
        return split_royalty(attr, 10_000, record_id="r-1", created_ms=created_ms, currency="EUR", departed=[left])

    during_notice = decode_record(split(1_000 + 30 * DAY_MS - 1))
    assert {p.member: (p.amount_minor, p.reason) for p in during_notice.payouts} == {
        "gone": (4_000, "paid"),
        "stays": (4_000, "paid"),
    }
    after = split_royalty(
        model, 10_000, record_id="r-2", created_ms=1_000 + 30 * DAY_MS, currency="EUR", departed=[left, elsewhere]
    )
    record = verify_settlement(after)  # the record alone recomputes, departure included
    assert [d.member for d in record.inputs.departed] == ["gone"]  # only the model's own members are named
    assert {p.member: (p.amount_minor, p.reason) for p in record.payouts} == {
        "gone": (0, "royalties_ended"),
        "stays": (8_000, "paid"),  # the share stays with members: the fee is 20 % as before
    }
    assert record.fee_minor == 2_000
    # The default terms (royalties continue) name no departure and keep the record's bytes as before the field.
    kept = attribution(members)
    assert split(10**12, kept) == split_royalty(kept, 10_000, record_id="r-1", created_ms=10**12, currency="EUR")
    assert b"departed" not in split(10**12, kept) and b"royalties_continue" not in split(10**12, kept)
    # A departure on a settlement record is malformed: a job's settlement always pays what was trained.
    with pytest.raises(MalformedError):
        decode_record(after.replace(b'"kind":"royalty"', b'"kind":"settlement"'))


def test_reservation_price_is_bounded_and_deterministic() -> None:
    assert reservation_price(0, KNOB) == 10_000
    assert reservation_price(1000, KNOB) == 19_997  # 10000 * e^0.693 = 19997.1
    assert reservation_price(-1000, KNOB) == 5_001  # 10000 * e^-0.693 = 5000.7
    steep = KnobPolicy(base_price_minor=10_000, alpha_milli=3000, min_price_minor=2_000, max_price_minor=50_000)
    assert reservation_price(1000, steep) == 50_000
    assert reservation_price(-1000, steep) == 2_000
    for bad in (1001, -1001):
        with pytest.raises(PolicyViolationError):
            reservation_price(bad, KNOB)


def test_knob_bounds_must_hold_the_base_price() -> None:
    with pytest.raises(PolicyViolationError):
        KnobPolicy(base_price_minor=100, min_price_minor=200, max_price_minor=300)


def test_quote_covers_member_prices_after_the_fee() -> None:
    quote = quote_job({"a": 0, "b": 1000, "c": -1000}, policy(2500))
    assert quote.members_minor == 10_000 + 19_997 + 5_001
    assert quote.total_minor == quote.members_minor + quote.fee_minor
    record = decode_record(settle(attribution([member("a", 1)], fee_bps=2500), quote.total_minor))
    assert record.pool_minor >= quote.members_minor
    assert record.fee_minor * 10_000 <= quote.total_minor * 2500


def test_member_statement_lists_earnings_with_record_hashes() -> None:
    first = settle(attribution([member("ann", 3), member("bob", 1)]), 1_000, record_id="s-1", created_ms=1_000)
    royalty = split_royalty(
        attribution([member("ann", 1), member("bob", 1)]), 500, record_id="r-1", created_ms=2_000, currency="EUR"
    )
    outside = settle(attribution([member("ann", 1)]), 10_000, record_id="s-2", created_ms=9_000)
    statement = member_statement("ann", [royalty, outside, first], period_start_ms=0, period_end_ms=5_000)
    assert [(line.record_id, line.amount_minor) for line in statement.lines] == [("s-1", 600), ("r-1", 200)]
    assert statement.lines[0].record_sha256 == record_hash(first)
    assert statement.totals_minor == {"EUR": 800}
    text = render_statement(statement)
    assert "Total: 800 EUR minor units" in text
    assert "job job-7: 600" in text
    # Each line shows the knob in force for the job and the price it gave (knob 0: the base price).
    assert [(line.knob_milli, line.price_minor) for line in statement.lines] == [(0, 10_000), (0, 10_000)]
    assert "(paid; knob +0.000, price 10000 EUR; record s-1" in text
    priced = settle(attribution([member("ann", 1, knob=500)]), 1_000, record_id="s-3", created_ms=3_000)
    (line,) = member_statement("ann", [priced], period_start_ms=0, period_end_ms=5_000).lines
    assert (line.knob_milli, line.price_minor) == (500, reservation_price(500, KNOB))


def test_policy_in_a_toml_config_file_with_a_high_fee_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "coordinator.toml"
    config.write_text(
        "[royalties]\nversion = 4\nfee_bps = 3100\n\n"
        "[royalties.knob]\nbase_price_minor = 1000\nmin_price_minor = 100\nmax_price_minor = 9000\n"
    )
    with pytest.raises(PolicyViolationError) as raised:
        RoyaltyPolicy.model_validate(tomllib.loads(config.read_text())["royalties"])
    assert raised.value.details["fee_bps"] == 3100
