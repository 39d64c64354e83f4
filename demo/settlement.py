"""The buyer pays the quote; the payment is split by the job's attribution, logged, recomputed, and stated.

All money is integer minor units (EUR cents). The settlement record is self-contained (policy, knobs, attribution,
payment, outputs), its canonical bytes are the body of a ledger leaf, and anyone holding the ledger can recompute
it byte for byte (coordinator.royalties).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from coordinator.attribution import AttributionAccount
from coordinator.ledger.store import LedgerStore
from coordinator.royalties import (
    KnobPolicy,
    RoyaltyPolicy,
    SplitRecord,
    decode_record,
    encode_record,
    model_attribution,
    quote_job,
    recompute_settlement,
    render_statement,
    settle_job,
    verify_settlement,
)
from coordinator.royalties.ledger_records import (
    append_split,
    find_split,
    recompute_from_ledger,
    report_revenue,
    statement_from_ledger,
)
from demo.checks import Outcomes, reason_of
from protocol.checkpoint import verify_receipts
from protocol.errors import Reason
from protocol.identity import VerifierKey
from protocol.leaves import Leaf, LeafKind, decode_leaf

CURRENCY = "EUR"
JOB_ID = "job-1"
MODEL_VERSION = "plaid-appliance-1.job-1"
RECORD_ID = "job-1.settlement"
ROYALTY_ID = "job-1.royalty-1"
KNOB = KnobPolicy(base_price_minor=10_000, min_price_minor=1_000, max_price_minor=100_000)
POLICY = RoyaltyPolicy(version=1, fee_bps=2000, knob=KNOB)


@dataclass(frozen=True)
class Settlement:
    record_bytes: bytes
    record: SplitRecord
    leaf_index: int


def settle(
    store: LedgerStore,
    account: AttributionAccount,
    knobs: dict[str, int],
    created_ms: int,
    outcomes: Outcomes,
    console: Console,
) -> Settlement:
    quote = quote_job(knobs, POLICY)
    console.print(
        f"   quote: members' prices {quote.members_minor} + MID fee {quote.fee_minor} = {quote.total_minor} "
        f"{CURRENCY} minor units (fee {POLICY.fee_bps / 100:.0f} %, cap 30 %); the buyer pays it",
        highlight=False,
    )
    attribution = model_attribution(account, knobs, job_id=JOB_ID, model_version=MODEL_VERSION, policy=POLICY)
    record_bytes = settle_job(
        attribution, quote.total_minor, record_id=RECORD_ID, created_ms=created_ms, currency=CURRENCY
    )
    index = append_split(store, record_bytes)
    record = decode_record(record_bytes)
    _show_payouts(record, console)

    paid = sum(p.amount_minor for p in record.payouts)
    outcomes.expect(
        "fee + payouts + unallocated == payment",
        quote.total_minor,
        record.fee_minor + paid + record.unallocated_minor,
    )
    outcomes.expect("fee within the 30 % cap", True, record.fee_minor * 10_000 <= 3000 * quote.total_minor)
    recomputed = recompute_from_ledger(store, RECORD_ID)
    outcomes.expect("settlement leaf recomputed from its own inputs", True, recomputed.matches)
    leaf = Leaf(LeafKind.SETTLEMENT, record_bytes).encode()
    outcomes.expect("recomputation byte for byte", True, recompute_settlement(record_bytes) == record_bytes)
    outcomes.expect("leaf in the ledger holds the record verbatim", True, leaf == store.leaf(index))

    skimmed = _skimmed(record)
    got, _ = reason_of(lambda: verify_settlement(skimmed))
    outcomes.expect("a record with 1 cent moved between payouts", Reason.SETTLEMENT_MISMATCH, got)
    got, _ = reason_of(lambda: RoyaltyPolicy(version=2, fee_bps=3500, knob=KNOB))
    outcomes.expect("a policy with a 35 % fee", Reason.POLICY_VIOLATION, got)
    return Settlement(record_bytes, record, index)


def later_royalty(
    store: LedgerStore, revenue_minor: int, created_ms: int, outcomes: Outcomes, console: Console
) -> None:
    """The buyer later reports revenue from the model: split by the attribution stored in the settlement leaf,
    under the policy and knobs recorded then, and logged as a royalty leaf."""
    index = report_revenue(
        store, MODEL_VERSION, revenue_minor, record_id=ROYALTY_ID, created_ms=created_ms, currency=CURRENCY
    )
    record = decode_record(decode_leaf(store.leaf(index)).signed)
    shares = ", ".join(f"{p.member} {p.amount_minor}" for p in record.payouts)
    console.print(f"   later revenue {revenue_minor} {CURRENCY} minor units for {MODEL_VERSION}:", highlight=False)
    console.print(f"   fee {record.fee_minor}; {shares}", highlight=False)
    paid = sum(p.amount_minor for p in record.payouts)
    outcomes.expect(
        "royalty: fee + payouts + unallocated == revenue",
        revenue_minor,
        record.fee_minor + paid + record.unallocated_minor,
    )
    outcomes.expect(
        "royalty leaf recomputed from its own inputs", True, recompute_from_ledger(store, ROYALTY_ID).matches
    )


def _show_payouts(record: SplitRecord, console: Console) -> None:
    values = {m.member: m for m in record.inputs.attribution.members}
    table = Table("member", "value units", "knob", "price", "screens", "amount", "reason", title="settlement")
    for p in record.payouts:
        member = values[p.member]
        table.add_row(
            p.member,
            f"{member.value_units:,}",
            str(member.knob_milli),
            str(p.price_minor),
            ", ".join(member.screens) or "-",
            f"{p.amount_minor:,}",
            p.reason,
        )
    table.add_row("MID fee", "", "", "", "", f"{record.fee_minor:,}", f"{record.inputs.attribution.policy.fee_bps} bps")
    if record.unallocated_minor:
        table.add_row("unallocated", "", "", "", "", f"{record.unallocated_minor:,}", "back to the buyer")
    console.print(table)


def _skimmed(record: SplitRecord) -> bytes:
    """The record as a dishonest operator might store it: one minor unit moved from the first paid member to the
    last member, outputs still summing to the payment."""
    payouts = list(record.payouts)
    giver = next(i for i, p in enumerate(payouts) if p.amount_minor > 0)
    taker = len(payouts) - 1 if giver != len(payouts) - 1 else 0
    payouts[giver] = payouts[giver].model_copy(update={"amount_minor": payouts[giver].amount_minor - 1})
    payouts[taker] = payouts[taker].model_copy(update={"amount_minor": payouts[taker].amount_minor + 1})
    return encode_record(record.model_copy(update={"payouts": payouts}))


def member_statement_page(
    store: LedgerStore,
    member: str,
    log_vkey: VerifierKey,
    period: tuple[int, int],
    folder: Path,
    outcomes: Outcomes,
    console: Console | None,
) -> str:
    """The member's one-page statement from the ledger, with each record's receipt verified offline; written to
    `folder`, and shown when `console` is given."""
    found = statement_from_ledger(store, member, period_start_ms=period[0], period_end_ms=period[1])
    text = render_statement(found.statement)
    items = []
    for line in found.statement.lines:
        items.append((found.receipts[line.record_id], store.leaf(find_split(store, line.record_id).index)))
    got, _ = reason_of(lambda: verify_receipts(items, log_vkey))
    outcomes.expect(f"{member}'s statement receipts verify offline", "accepted", got)
    folder.mkdir(exist_ok=True)
    (folder / f"{member}.statement.txt").write_text(text)
    if console is not None:
        console.print(Panel(text.rstrip(), title=f"statement for {member}", expand=False))
    return text
