"""The demo's closing table: per member, what the ledger holds about it (contribution reports, its value in the
job, its settlement and royalty payouts) and whether its statement verified on its own agent; every number read
from the ledger's leaves (demo.ledger_facts), written to summary.json as well so a test can check each one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from coordinator.royalties.settlement import SplitRecord
from demo.households import Household
from demo.ledger_facts import LedgerFacts


@dataclass(frozen=True)
class MemberLine:
    member: str
    device: str
    role: str
    trained: bool
    """Its device took part in the job (the JOB leaf lists it as selected)."""
    contributions: int
    """Contribution reports of the job's run logged for its device."""
    value_units: int | None
    valued_rounds: int
    """Rounds the job valued its updates in (the JOB leaf's attribution)."""
    excluded_rounds: int
    """Of those, rounds a screen excluded it from the valuation."""
    screens: list[str]
    settlement_minor: int
    royalty_minor: int
    statement_verified: bool | None
    """Its agent verified its statement against the log (None: not asked)."""


@dataclass(frozen=True)
class SplitLine:
    """One SETTLEMENT or ROYALTY leaf: the payment and where it went."""

    index: int
    record_id: str
    payment_minor: int
    fee_minor: int
    members_minor: int
    unallocated_minor: int

    @classmethod
    def of(cls, index: int, record: SplitRecord) -> SplitLine:
        members = sum(p.amount_minor for p in record.payouts)
        return cls(
            index,
            record.inputs.record_id,
            record.inputs.payment_minor,
            record.fee_minor,
            members,
            record.unallocated_minor,
        )


@dataclass
class Summary:
    job_id: str
    model_version: str | None
    run_id: int | None
    ledger_size: int
    members: list[MemberLine]
    settlement: SplitLine | None
    royalty: SplitLine | None
    strikes: list[dict[str, object]] = field(default_factory=list)
    accuracy: dict[str, object] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    def show(self, console: Console, currency: str) -> None:
        table = Table(
            "member",
            "role",
            "trained",
            "reports logged",
            "value (nano-units)",
            "screened out",
            f"settlement {currency}",
            f"royalty {currency}",
            "statement verified",
            title=f"{self.job_id} ({self.model_version}), from the ledger ({self.ledger_size} leaves)",
        )
        for m in self.members:
            table.add_row(
                m.member,
                m.role,
                "yes" if m.trained else "no",
                str(m.contributions),
                "-" if m.value_units is None else f"{m.value_units:,}",
                f"{m.excluded_rounds}/{m.valued_rounds} ({', '.join(m.screens)})" if m.screens else "-",
                _money(m.settlement_minor),
                _money(m.royalty_minor),
                {True: "yes", False: "NO", None: "-"}[m.statement_verified],
            )
        for label, split in (("MID fee", "fee_minor"), ("unallocated (back to the buyer)", "unallocated_minor")):
            settled = getattr(self.settlement, split) if self.settlement else 0
            royalty = getattr(self.royalty, split) if self.royalty else 0
            table.add_row(label, "", "", "", "", "", _money(settled), _money(royalty), "")
        paid = self.settlement.payment_minor if self.settlement else 0
        earned = self.royalty.payment_minor if self.royalty else 0
        table.add_row("total paid by the buyer", "", "", "", "", "", _money(paid), _money(earned), "", style="bold")
        console.print(table)


def summarise(
    facts: LedgerFacts,
    job_id: str,
    households: list[Household],
    devices: dict[str, str],
    statements: dict[str, bool],
) -> Summary:
    """The summary of job `job_id` from the ledger `facts`; `devices`: member -> device; `statements`: member ->
    whether its agent verified its statement."""
    job = facts.job(job_id)
    run_id = job.run_id if job else None
    selected = {d.device for d in job.devices if d.selected} if job else set()
    values = {v.member: v for v in job.attribution} if job else {}
    contributions = facts.contributions_of(run_id) if run_id is not None else {}
    settlement = _split_of(facts.settlements, job_id)
    royalty = _split_of(facts.royalties, job_id)
    lines = []
    for h in households:
        device = devices[h.member]
        value = values.get(h.member)
        lines.append(
            MemberLine(
                member=h.member,
                device=device,
                role=str(h.role),
                trained=device in selected,
                contributions=contributions.get(device, 0),
                value_units=value.value_units if value else None,
                valued_rounds=value.rounds if value else 0,
                excluded_rounds=value.excluded_rounds if value else 0,
                screens=list(value.screens) if value else [],
                settlement_minor=_paid(settlement, h.member),
                royalty_minor=_paid(royalty, h.member),
                statement_verified=statements.get(h.member),
            )
        )
    strikes: list[dict[str, object]] = [
        {"index": s.index, "device": s.device, "buyer": s.vote.target_buyer, "purpose": s.vote.target_purpose}
        for s in facts.strikes
    ]
    return Summary(
        job_id=job_id,
        model_version=job.model_version if job else None,
        run_id=run_id,
        ledger_size=facts.size,
        members=lines,
        settlement=SplitLine.of(*settlement) if settlement else None,
        royalty=SplitLine.of(*royalty) if royalty else None,
        strikes=strikes,
    )


def _split_of(records: list[tuple[int, SplitRecord]], job_id: str) -> tuple[int, SplitRecord] | None:
    return next(((i, r) for i, r in records if r.inputs.attribution.job_id == job_id), None)


def _paid(split: tuple[int, SplitRecord] | None, member: str) -> int:
    if split is None:
        return 0
    return sum(p.amount_minor for p in split[1].payouts if p.member == member)


def _money(minor: int) -> str:
    return f"{minor / 100:,.2f}"
