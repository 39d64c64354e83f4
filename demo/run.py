"""The demo proper: one MID, three households and a free rider, one buyer, in one process on real parts.

Order of events: keys -> households replay PLAID into their stores -> federated rounds (train, seal, verify, log,
receipts, value, aggregate) with the coordinator's refusals shown after round 1 -> settlement and statement ->
members bring their checkpoints up to date, audit the log, and catch a rewritten history -> what did not run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from coordinator.attribution import RoundValuation
from coordinator.ledger.audit import audit_ledger
from coordinator.ledger.store import LedgerStore
from coordinator.royalties.ledger_records import find_split
from demo.checks import Outcomes, reason_of
from demo.households import Household, build_households, buyer_validation
from demo.identities import Identities, create_identities
from demo.reports import IngestChecks, round_nonce, seal_report, show_rejections
from demo.scope import show_scope
from demo.settlement import RECORD_ID, later_royalty, member_statement_page, settle
from demo.trail import MemberLedgerView, log_reports, show_rewritten_history_caught, witness_and_cosign
from demo.training import Arrays, FederatedJob, LocalUpdate, local_round
from protocol.envelope import KeyRing
from protocol.messages import ContributionReport
from protocol.witness import Cosigner, LogView

HONEST = ("household-1", "household-2", "household-3")
FREE_RIDER = "household-4"
# Each member's one knob (milli-units, -1000..1000): how much above or below the MID's base price they sell.
KNOBS = {"household-1": 0, "household-2": 300, "household-3": -200, FREE_RIDER: 0}
RUN_ID = 1
MIN_REPUTATION_MILLI = 500
WITNESS_QUORUM = 3
LATER_REVENUE_MINOR = 12_345  # what the buyer later reports earning with the model
ROUNDS = 3


def run(workdir: Path, console: Console, rounds: int = ROUNDS) -> bool:
    """Run every step in `workdir`; True when every outcome was the expected one."""
    started, started_ms = time.perf_counter(), int(time.time() * 1000)
    outcomes = Outcomes(console)
    names = [*HONEST, FREE_RIDER]
    console.print(Panel.fit("midgate demo: one MID, three households and a free rider, one buyer", style="bold"))

    _section(console, 1, "identities")
    ids = create_identities(workdir, names, console)

    _section(console, 2, "sensors: each household replays its own PLAID recordings into its sample store")
    households = build_households(workdir, names, {FREE_RIDER}, console)
    validation = buyer_validation()
    console.print(f"   the buyer's held-out validation data: PLAID test split, {len(validation.y)} recordings")

    with LedgerStore.open(workdir / "ledger.db", ids.log_key) as store:
        members = {n: MemberLedgerView(n, LogView(ids.log_key.verifier)) for n in names}
        scene = Scene(workdir, console, outcomes, ids, households, members, store, FederatedJob(validation))
        _section(console, 3, f"federated rounds in this process ({rounds}), task plaid-appliance@1")
        _federated_rounds(scene, rounds)
        _section(console, 4, "settlement of the buyer's payment, and a later royalty")
        _settlement(scene, started_ms)
        _section(console, 5, "members check the log")
        _members_check(scene)
        size = store.size

    _section(console, 6, "what ran, and what is not in the demo yet")
    show_scope(console)
    _verdict(workdir, size, outcomes, time.perf_counter() - started, console)
    return outcomes.all_ok


@dataclass(frozen=True)
class Scene:
    """Everything the steps share: where files go, who takes part, the ledger, the job."""

    workdir: Path
    console: Console
    outcomes: Outcomes
    ids: Identities
    households: list[Household]
    members: dict[str, MemberLedgerView]
    store: LedgerStore
    job: FederatedJob


def _federated_rounds(scene: Scene, rounds: int) -> None:
    job, store, outcomes = scene.job, scene.store, scene.outcomes
    accuracy = [job.buyer_metrics()["accuracy"]]
    scene.console.print(f"   initial global model: buyer accuracy {accuracy[0]:.1%}")
    checks = IngestChecks(KeyRing([k.verifier for k in scene.ids.devices.values()]))
    for r in range(1, rounds + 1):
        with scene.console.status(f"round {r}: households train on their own windows"):
            updates = [local_round(h, job.global_arrays, r) for h in scene.households]
        logged = _log_round(r, scene, updates, checks, job.global_arrays)
        with scene.console.status(f"round {r}: the coordinator screens and values the updates"):
            valuation = job.value_and_aggregate(r, updates)
        accuracy.append(job.buyer_metrics()["accuracy"])
        _show_round(r, updates, logged, valuation, accuracy[-1], scene.console)
        if r == 1:
            size, first = store.size, HONEST[0]
            entry = logged[first]
            accepted = (entry.report, entry.envelope, updates[0].returned)
            key, key_file = scene.ids.devices[first], scene.ids.key_files[first]
            show_rejections(checks, accepted, key, key_file, outcomes, scene.console)
            outcomes.expect("ledger size after the refusals", size, store.size)
    outcomes.expect("free rider's accumulated value", 0.0, job.account.totals[FREE_RIDER])
    scores = ", ".join(f"{n} {job.reputation.score_milli(n)}" for n in scene.members)
    scene.console.print(f"   reputation (milli, 500 = newcomer): {scores}", highlight=False)
    outcomes.expect(
        f"who meets a job's minimum reputation of {MIN_REPUTATION_MILLI}",
        list(HONEST),
        [n for n in scene.members if job.reputation.meets(n, MIN_REPUTATION_MILLI)],
    )
    outcomes.expect("buyer accuracy improved over the rounds", True, accuracy[-1] > accuracy[0])


def _settlement(scene: Scene, started_ms: int) -> None:
    store, outcomes = scene.store, scene.outcomes
    settlement = settle(store, scene.job.account, KNOBS, int(time.time() * 1000), outcomes, scene.console)
    paid = {p.member: p.amount_minor for p in settlement.record.payouts}
    outcomes.expect("free rider paid", 0, paid[FREE_RIDER])
    outcomes.expect("every honest household paid", True, all(paid[n] > 0 for n in HONEST))
    later_royalty(store, LATER_REVENUE_MINOR, int(time.time() * 1000), outcomes, scene.console)
    period = (started_ms, int(time.time() * 1000) + 1)
    for name in scene.members:
        shown = scene.console if name == HONEST[0] else None
        vkey = scene.ids.log_key.verifier
        member_statement_page(store, name, vkey, period, scene.workdir / "statements", outcomes, shown)


def _members_check(scene: Scene) -> None:
    store, outcomes = scene.store, scene.outcomes
    witness_and_cosign(store, scene.members, scene.ids.witnesses, WITNESS_QUORUM, outcomes)
    folder = scene.workdir / "members"
    for member in scene.members.values():
        member.save_checkpoint(folder)
        (folder / f"{member.name}.witness.vkey").write_text(Cosigner(scene.ids.witnesses[member.name]).verifier.text())
    settlement = find_split(store, RECORD_ID).index
    (folder / "settlement.leaf").write_bytes(store.leaf(settlement))
    (folder / "settlement.receipt").write_text(store.receipt(settlement))
    notes = [v.view.note or b"" for v in scene.members.values()]
    got, _ = reason_of(lambda: audit_ledger(store.path, scene.ids.log_key.verifier, notes))
    outcomes.expect("full audit of the ledger file with every member's checkpoint", "accepted", got)
    member = scene.members[HONEST[0]]
    show_rewritten_history_caught(store, scene.ids.log_key, member, scene.workdir / "attack", outcomes, scene.console)


@dataclass(frozen=True)
class LoggedReport:
    report: ContributionReport
    envelope: bytes
    leaf_index: int
    receipt_verified: bool
    trusted_size: int


def _log_round(
    round_index: int, scene: Scene, updates: list[LocalUpdate], checks: IngestChecks, sent: Arrays
) -> dict[str, LoggedReport]:
    """Devices seal their reports; the coordinator verifies each against the update it received and logs them in
    one batch; each household verifies its receipt and moves its trusted checkpoint forward."""
    households, ids, store, members, outcomes = scene.households, scene.ids, scene.store, scene.members, scene.outcomes
    nonce = round_nonce()
    sealed: dict[str, tuple[ContributionReport, bytes]] = {}
    for household, update in zip(households, updates, strict=True):
        node_id = 1_000 + households.index(household)
        report, envelope = seal_report(
            ids.devices[household.name],
            update,
            run_id=RUN_ID,
            round_index=round_index,
            node_id=node_id,
            seq=round_index,
            nonce=nonce,
            fingerprint_hex=household.fingerprint_hex,
        )
        got, _ = reason_of(lambda: checks.accept(envelope, update.returned, sent))  # noqa: B023 - called at once
        if outcomes.record(f"round {round_index}: {household.name}'s report verified", "accepted", got):
            sealed[household.name] = (report, envelope)
    logged = log_reports(store, {name: envelope for name, (_, envelope) in sealed.items()})
    out = {}
    for name, (index, leaf) in logged.items():
        receipt = store.receipt(index)
        got, _ = reason_of(lambda: members[name].take_receipt(receipt, leaf, store))  # noqa: B023 - called at once
        verified = outcomes.record(f"round {round_index}: {name} verifies its receipt offline", "accepted", got)
        report, envelope = sealed[name]
        out[name] = LoggedReport(report, envelope, index, verified, members[name].view.checkpoint.size)
    return out


def _show_round(
    round_index: int,
    updates: list[LocalUpdate],
    logged: dict[str, LoggedReport],
    valuation: RoundValuation,
    accuracy: float,
    console: Console,
) -> None:
    table = Table(
        "household",
        "windows claimed",
        "local loss",
        "leaf",
        "receipt",
        "screens",
        "value",
        "weight",
        title=f"round {round_index} ({valuation.method}, {valuation.evaluations} loss evaluations)",
    )
    for u in updates:
        entry = logged.get(u.household)
        flags = ", ".join(str(f.reason) for f in valuation.flags.get(u.household, [])) or "-"
        table.add_row(
            u.household,
            str(u.examples_claimed),
            f"{u.loss_before:.3f} -> {u.loss_after:.3f}",
            str(entry.leaf_index) if entry else "[red]not logged[/]",
            _receipt_cell(entry),
            flags,
            f"{valuation.values[u.household]:+.4f}",
            f"{valuation.weights[u.household]:.3f}",
        )
    console.print(table)
    console.print(f"   global model after round {round_index}: buyer accuracy {accuracy:.1%}")


def _receipt_cell(entry: LoggedReport | None) -> str:
    if entry is None:
        return "-"
    return f"ok, trusts size {entry.trusted_size}" if entry.receipt_verified else "[bold red]does not verify[/]"


def _section(console: Console, number: int, title: str) -> None:
    console.print(f"\n[bold]{number}. {title}[/]")


def _verdict(workdir: Path, size: int, outcomes: Outcomes, seconds: float, console: Console) -> None:
    total, failed = len(outcomes.steps), outcomes.failed
    if failed:
        console.print(f"\n[bold red]{len(failed)} of {total} outcomes differed from the expected ones:[/]")
        for step in failed:
            console.print(f"   {step.step}: expected {step.expected}, got {step.got}", highlight=False)
    else:
        console.print(f"\n[green]all {total} outcomes as expected[/] in {seconds:.1f} s")
    console.print(
        f"ledger: {workdir / 'ledger.db'} ({size} leaves); log key {(workdir / 'log.vkey').read_text().strip()}"
    )
