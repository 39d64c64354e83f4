"""The demo's steps, in order: each is what the operator, a member, the buyer or an auditor runs, as a real process.

1. The operator sets up the MID: the buyer's key in its config, `broker-config`, Mosquitto, `coordinator serve`
   (with its Flower SuperLink).
2. Households join: `coordinator invite`, `agent enrol`, `agent run` replaying their PLAID recordings.
3. One household pauses, one strikes against the buyer (its signed vote becomes a ledger leaf); the operator sees
   both in `coordinator devices`.
4. The operator runs the buyer's job (`coordinator job start`): it neither invites nor waits for the paused and the
   striking household, the others train in Flower rounds on their devices, every round valued; `serve` logs the job
   and its rounds.
5. The operator settles it (`job settle`), the buyer reports revenue (`buyer report-revenue`).
6. Every member verifies its statement on its own agent (`agent statement`), and one proves its receipts (`agent
   receipts --verify`); a payout the operator changes in its database is refused by that member's agent.
7. An auditor checks the whole log (`ledger verify`).
Then every process is stopped, and the summary, the checks and the accuracy comparison are read from the files.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table

from demo.baseline import CentralResult, train_central
from demo.broker import BrokerKind, BrokerPlan, find_mosquitto
from demo.checks import Outcomes
from demo.households import Household, Role, plan_households
from demo.ledger_facts import LedgerFacts
from demo.scope import show_scope
from demo.services import MIDGATE, DemoStepError, Processes, Service, shown, wait_until
from demo.summary import Summary, summarise
from edge.sensors.store import SampleStore
from protocol.tasks.spec import get_task

MID = "riverside"
BUYER = "acme"
JOB = "job-1"
TASK = get_task("plaid-appliance", 1)
PURPOSE = "research"
FEE_BPS = 2000
PAYMENT_MINOR = 100_000
"""What the buyer pays for the job: 1,000.00 EUR."""
REVENUE_MINOR = 40_000
"""What the buyer reports having earned with the model in one month: 400.00 EUR."""
REVENUE_PERIOD_MS = (1_798_761_600_000, 1_801_440_000_000)
JOIN_TIMEOUT_S = 30.0
"""How long the job's first round waits for the invited SuperNodes to join; an agent starts its SuperNode about
10 s after its invitation here. The paused and the striking households are neither invited nor waited for: their
agents told the MID (`job start` says so), so nothing is waited out."""
ROUND_TIMEOUT_S = 90.0
RECIPE_MEASURED = (0.784, 0.832)
RECIPE_GAP_POINTS = 1.6
"""The task's 60-round recipe deployed on 5 devices: PLAID test accuracy range and mean gap to central over 7 runs
(BENCHMARKS.md, "Accuracy, session 6")."""


@dataclass(frozen=True)
class Command:
    """One `midgate` command someone types: who, its words after `midgate`, its log's name (default: its command
    words), whether its output is shown, and a secret to cut short when it is."""

    role: str
    args: str
    name: str = ""
    quiet: bool = False
    secret: str = ""


@dataclass(frozen=True)
class DemoPaths:
    """Where everything lives under the demo's folder; commands run there and name these relative to it."""

    root: Path

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    @property
    def config(self) -> Path:
        return self.root / "coordinator.toml"

    @property
    def coordinator(self) -> Path:
        return self.root / "coordinator"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def buyer_key(self) -> Path:
        return self.root / "buyer" / f"{BUYER}.key"

    @property
    def validation(self) -> Path:
        return self.root / "buyer" / "validation.npz"

    @property
    def members(self) -> Path:
        return self.root / "members"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def ledger(self) -> Path:
        return self.coordinator / "ledger.sqlite"

    @property
    def log_vkey(self) -> Path:
        return self.root / "mid.vkey"


def _free_port() -> int:
    from coordinator.federation.superlink_process import free_loopback_port

    return free_loopback_port()


def tail_for(rounds: int) -> int:
    """The recipe averages its last 10 of 60 rounds; a shorter job averages the same share of its rounds."""
    return max(1, round(rounds * TASK.recipe.tail_average / TASK.recipe.rounds))


@dataclass
class DemoRun:
    """One run of the demo in `paths.root`; `processes` holds everything it starts (the caller stops them)."""

    paths: DemoPaths
    console: Console
    processes: Processes
    rounds: int
    broker: BrokerPlan
    outcomes: Outcomes = field(init=False)
    http_port: int = field(default_factory=_free_port)
    link_port: int = field(default_factory=_free_port)
    households: list[Household] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)
    """member -> its device id, as `agent enrol` printed it."""
    job_record: dict[str, object] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.outcomes = Outcomes(self.console)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # --- printing -----------------------------------------------------------------------------------------------

    def step(self, title: str) -> None:
        self.console.rule(f"[bold]{title}[/]  [dim]{time.monotonic() - self.started:.0f} s[/]", align="left")

    def command(self, role: str, args: str, *, name: str = "", quiet: bool = False, secret: str = "") -> str:
        """Run `midgate ARGS` (words split on spaces) as `role` would: `commands` with one; its output."""
        return self.commands([Command(role, args, name, quiet, secret)])[0].stdout

    def commands(self, batch: list[Command], check: bool = True) -> list[subprocess.CompletedProcess[str]]:
        """Run `midgate` commands side by side (as different people would at the same time), then show each command
        line (its `secret` cut short) and, unless quiet, what it printed; their results in order."""
        runs = [(c.name or _log_name(c.args), [*MIDGATE, *c.args.split()]) for c in batch]
        results = self.processes.run_all(runs, timeout_s=120.0, check=check)
        for c, (_, argv), result in zip(batch, runs, results, strict=True):
            line = shown(argv).replace(c.secret, c.secret[:8] + "...") if c.secret else shown(argv)
            self.console.print(f"[dim]{c.role:>11}[/] [bold]$[/] {line}", soft_wrap=True)
            if not c.quiet:
                self._print_output(result.stdout)
        return results

    def _print_output(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            self.console.print(f"              {line}", style="dim", markup=False, soft_wrap=True)

    def note(self, role: str, text: str) -> None:
        self.console.print(f"[dim]{role:>11}[/]   {text}", soft_wrap=True)

    def start(self, role: str, name: str, argv: list[str], what: str, env: dict[str, str] | None = None) -> Service:
        service = self.processes.start(name, argv, env)
        self.console.print(
            f"[dim]{role:>11}[/] [bold]&[/] {shown(argv)}  [dim](pid {service.proc.pid}; {what})[/]", soft_wrap=True
        )
        return service

    # --- 1. the MID --------------------------------------------------------------------------------------------

    def start_mid(self) -> None:
        self.step("1. The MID operator starts its broker, `coordinator serve` and its Flower SuperLink")
        p = self.paths
        verifier = self.command("buyer", f"buyer keygen --key {p.rel(p.buyer_key)} --name {BUYER}").strip()
        p.config.write_text(self._coordinator_toml(verifier))
        self.note("operator", f"wrote {p.rel(p.config)}, with the buyer's key under \\[buyers.keys]")
        if self.broker.kind is BrokerKind.MOSQUITTO:
            self.command("operator", "coordinator broker-config --config coordinator.toml")
            what = (
                f"devices on its TLS listener 127.0.0.1:{self.broker.device_port} with the MID's CA, the "
                f"coordinator on its loopback listener 127.0.0.1:{self.broker.local_port}"
            )
        else:
            self.broker.embedded_config(p.broker)
            what = f"the EMBEDDED broker: plain TCP on 127.0.0.1:{self.broker.device_port}, no logins, no ACL"
        broker = self.start("operator", "broker", self.broker.argv(p.broker), what)
        self._wait_port(broker, self.broker.device_port)
        self._wait_port(broker, self.broker.local_port)
        serve = self.start(
            "operator",
            "coordinator-serve",
            [*MIDGATE, "coordinator", "serve", "--config", "coordinator.toml"],
            f"enrolment and buyer API on {self.url}; its SuperLink on 127.0.0.1:{self.link_port} with TLS and "
            "SuperNode authentication",
        )
        address = p.coordinator / "federation" / "superlink-address"
        wait_until(lambda: (_http_ready(self.url) and address.exists()) or not serve.alive, 90, "coordinator serve")
        if not serve.alive:
            raise DemoStepError(f"coordinator serve exited during startup:\n{serve.log_tail()}")
        with urllib.request.urlopen(f"{self.url}/v1/info", timeout=10) as response:
            p.log_vkey.write_text(json.loads(response.read())["mid_key"] + "\n")

    def _coordinator_toml(self, buyer_verifier: str) -> str:
        return (
            f'mid = "{MID}"\n'
            f'data_dir = "{self.paths.coordinator}"\n'
            "log_json = false\n"
            f"{self.broker.coordinator_toml(self.paths.broker)}"
            f'[enrolment]\nhost = "127.0.0.1"\nport = {self.http_port}\n'
            f"[federation]\nenabled = true\nport = {self.link_port}\n"
            f'[royalties]\nfee_bps = {FEE_BPS}\ncurrency = "EUR"\n'
            f'[buyers.keys]\n{BUYER} = "{buyer_verifier}"\n'
        )

    def _wait_port(self, service: Service, port: int) -> None:
        from coordinator.federation.superlink_process import wait_for_port

        try:
            wait_for_port("127.0.0.1", port, time.monotonic() + 30, service.proc)
        except (RuntimeError, TimeoutError) as error:
            raise DemoStepError(f"{service.name}: {error}\n{service.log_tail()}") from None

    # --- 2. households -----------------------------------------------------------------------------------------

    def join_members(self) -> None:
        self.step("2. Households join: invited by the operator, each enrols and runs its own agent")
        self.households = plan_households(self.paths.members)
        for h in self.households:
            h.folder.mkdir(parents=True)
            h.config.write_text(h.agent_toml(self.broker.mqtt_protocol))
        invites = [
            Command("operator", f"coordinator invite {h.member} --config coordinator.toml", f"invite-{h.member}", True)
            for h in self.households
        ]
        tokens = [result.stdout.strip() for result in self.commands(invites)]
        enrols = [
            Command(
                h.member,
                f"agent enrol --mid {self.url} --invite {token} --config {self.paths.rel(h.config)}",
                f"enrol-{h.member}",
                secret=token,
            )
            for h, token in zip(self.households, tokens, strict=True)
        ]
        for h, enrolled in zip(self.households, self.commands(enrols), strict=True):
            self.devices[h.member] = enrolled.stdout.split(" as device ")[1].split()[0]
        agents: list[tuple[Household, Service]] = []
        for h in self.households:
            argv = [*MIDGATE, "agent", "run", "--config", self.paths.rel(h.config)]
            agents.append((h, self.start(h.member, f"agent-{h.member}", argv, f"{len(h.series)} PLAID recordings")))
        for h, agent in agents:
            ready = partial(_agent_ready, agent, h.store)
            wait_until(ready, 120, f"{h.member}'s agent: recordings loaded and connected to the broker")
            if not agent.alive:
                raise DemoStepError(f"{h.member}'s agent exited:\n{agent.log_tail()}")
        table = Table("member", "device", "role", "recordings", "appliances", "most recorded", "samples stored")
        for h in self.households:
            with SampleStore(h.store, readonly=True) as store:
                samples = store.count()
            table.add_row(
                h.member,
                self.devices[h.member],
                str(h.role),
                str(len(h.series)),
                str(len(h.classes)),
                ", ".join(h.classes[:2]),
                f"{samples:,}",
            )
        self.console.print(table)

    # --- 3. pause and strike -----------------------------------------------------------------------------------

    def pause_and_strike(self) -> None:
        """One member pauses, one strikes against the job's buyer, each on its own device; their agents say so in
        signed messages (a heartbeat saying paused, a StrikeVote the ledger logs), and the operator sees it in
        `coordinator devices` before starting the job."""
        self.step("3. Member controls on the members' own devices: a pause and a data strike")
        paused = next(h for h in self.households if h.role is Role.PAUSES)
        striker = next(h for h in self.households if h.role is Role.STRIKES)
        self.commands(
            [
                Command(paused.member, f"agent pause --config {self.paths.rel(paused.config)}"),
                Command(striker.member, f"agent strike --buyer {BUYER} --config {self.paths.rel(striker.config)}"),
            ]
        )
        device = self.devices[striker.member]

        def logged_vote() -> str | None:
            votes = [s for s in LedgerFacts.read(self.paths.ledger).strikes if s.device == device]
            return f"buyer {votes[0].vote.target_buyer}, purpose {votes[0].vote.target_purpose}" if votes else None

        wait_until(lambda: logged_vote() is not None, 60, f"{striker.member}'s strike vote in the ledger", 0.5)
        self.outcomes.expect(
            f"{striker.member}'s signed vote is a STRIKE leaf", f"buyer {BUYER}, purpose None", logged_vote()
        )
        wait_until(
            partial(_mid_heard, self.paths.coordinator / "registry.sqlite", self.devices, paused, striker),
            60,
            "the MID to hear every device, the pause and the strike",
            0.5,
        )
        self.command("operator", "coordinator devices --config coordinator.toml", name="coordinator-devices")

    # --- 4. the job --------------------------------------------------------------------------------------------

    def run_job(self) -> None:
        tail = tail_for(self.rounds)
        self.step(f"4. The buyer's job: {TASK.key}, {self.rounds} rounds on the households' Flower SuperNodes")
        self.buyer_validation()
        args = (
            f"coordinator job start {JOB} --task {TASK.key} --rounds {self.rounds} --tail-average {tail} "
            f"--validation {self.paths.rel(self.paths.validation)} --purpose {PURPOSE} --buyer {BUYER} "
            f"--join-timeout {JOIN_TIMEOUT_S:.0f} --round-timeout {ROUND_TIMEOUT_S:.0f} --config coordinator.toml"
        )
        argv = [*MIDGATE, *args.split()]
        self.console.print(f"[dim]{'operator':>11}[/] [bold]$[/] {shown(argv)}", soft_wrap=True)
        job = self.processes.start("job-start", argv)
        self._follow(job, JOIN_TIMEOUT_S + self.rounds * (ROUND_TIMEOUT_S + JOIN_TIMEOUT_S) + 300)
        if job.proc.returncode != 0:
            raise DemoStepError(f"the job did not complete (exit {job.proc.returncode}); its log: {job.log}")
        shown_job = self.command("operator", f"coordinator job show {JOB} --config coordinator.toml", quiet=True)
        self.job_record = json.loads(shown_job)
        not_waited = self.job_record.get("not_waited_for") or {}
        assert isinstance(not_waited, dict)
        sat_out = {self.devices[h.member]: h.member for h in self.households if h.role.sits_out}
        self.outcomes.expect(
            "`job start` neither invited nor waited for the paused and the striking household",
            sorted(sat_out.values()),
            sorted(sat_out.get(str(device), str(device)) for device in not_waited),
        )
        self.note(
            "operator",
            f"`job show` names the model version the buyer reports against: {self.job_record['model_version']}",
        )

    def buyer_validation(self) -> None:
        """The buyer cuts its validation windows from PLAID's test recordings, which no household holds, with the
        tools the members' agents use: a replay into a sample store of its own, then the task's windows from it."""
        p = self.paths
        config = p.buyer_key.parent / "sensors.toml"
        config.write_text(
            f'data_dir = "{p.buyer_key.parent / "data"}"\n\n'
            '[[sensors]]\ndriver = "replay"\nname = "plaid"\nsplit = "test"\nspeed = "max"\n'
        )
        self.command("buyer", f"agent sensors sample --config {p.rel(config)}", quiet=True)
        self.command(
            "buyer",
            f"agent sensors windows --config {p.rel(config)} --task {TASK.key} --out {p.rel(p.validation)}",
        )

    def _follow(self, service: Service, timeout_s: float) -> None:
        """Echo a running command's output as it comes, until it exits; then it is no longer tracked."""
        deadline = time.monotonic() + timeout_s
        echoed = 0
        while True:
            done = not service.alive
            data = service.log.read_bytes()
            cut = len(data) if done else data.rfind(b"\n") + 1
            if cut > echoed:
                self._print_output(data[echoed:cut].decode(errors="replace"))
                echoed = cut
            if done:
                break
            if time.monotonic() > deadline:
                raise DemoStepError(f"{service.name} still running after {timeout_s:.0f} s")
            time.sleep(0.25)
        self.processes.services.remove(service)

    def wait_for_reports(self) -> None:
        """Every update the job's ROUND leaves record is owed a contribution report: wait until all are logged."""
        job = LedgerFacts.read(self.paths.ledger).job(JOB)
        if job is None or job.run_id is None:
            raise DemoStepError("no JOB leaf: serve did not log the job")
        run_id = job.run_id

        def all_logged() -> bool:
            facts = LedgerFacts.read(self.paths.ledger)
            return sum(facts.contributions_of(run_id).values()) >= facts.captured_updates(JOB)

        wait_until(all_logged, 60, "every device's contribution reports in the ledger", 0.5)

    # --- 5. money ----------------------------------------------------------------------------------------------

    def settle(self) -> None:
        self.step("5. The buyer pays for the job, then reports revenue from the model: settlement and royalties")
        pay = f"coordinator job settle {JOB} --payment {PAYMENT_MINOR} --currency EUR --config coordinator.toml"
        self.command("operator", pay)
        report = (
            f"buyer report-revenue {self.job_record['model_version']} {REVENUE_MINOR} "
            f"--key {self.paths.rel(self.paths.buyer_key)} --coordinator {self.url} --mid {MID} --buyer {BUYER} "
            f"--model-id appliance-classifier --currency EUR --period-start-ms {REVENUE_PERIOD_MS[0]} "
            f"--period-end-ms {REVENUE_PERIOD_MS[1]} --seq 1"
        )
        receipt = json.loads(self.command("buyer", report, quiet=True))
        self.note("buyer", f"accepted: royalty record {receipt['record_id']}, ROYALTY leaf {receipt['index']}")

    # --- 6. members check ---------------------------------------------------------------------------------------

    def members_check(self) -> dict[str, bool]:
        """Every member fetches its statement on its own agent, which verifies each line before printing it; one
        member also proves every receipt it kept; then the operator changes a payout in its database behind the
        log's back, and that member's agent refuses the statement. Returns member -> statement verified."""
        self.step("6. Each member verifies its statement on its own agent")
        size = LedgerFacts.read(self.paths.ledger).size
        wait_until(lambda: _witnessed_size(self.url) >= size, 60, f"a witnessed checkpoint of size {size}", 0.5)
        self.note("", f"the agents, as the log's witnesses, cosigned its checkpoint of size {size}")
        first = self.households[0]
        checks = [
            Command(h.member, f"agent statement --config {self.paths.rel(h.config)}", f"statement-{h.member}")
            for h in self.households
        ]
        receipts = Command(first.member, f"agent receipts --verify --config {self.paths.rel(first.config)}", quiet=True)
        *statements, kept = self.commands([*checks, receipts], check=False)
        verified = {h.member: result.returncode == 0 for h, result in zip(self.households, statements, strict=True)}
        self.outcomes.expect("statements verified on the members' own agents", len(verified), sum(verified.values()))
        self.outcomes.expect(
            f"{first.member} proves every report, vote and enrolment it kept (`agent receipts --verify`)",
            "exit 0",
            f"exit {kept.returncode}",
        )
        for h in self.households:
            url = h.data_dir / "member-page.url"
            if url.exists():
                self.note(h.member, f"the same statement in a browser: {url.read_text().strip()}")
        self._tampered_statement_refused(first)
        return verified

    def _tampered_statement_refused(self, member: Household) -> None:
        """The operator adds 90.00 EUR to `member`'s payout in the ledger database; the agent must refuse."""
        facts = LedgerFacts.read(self.paths.ledger)
        index, record = next((i, r) for i, r in facts.settlements if r.inputs.attribution.job_id == JOB)
        paid = next(p.amount_minor for p in record.payouts if p.member == member.member)
        old, new = f'"amount_minor":{paid}'.encode(), f'"amount_minor":{paid + 9000}'.encode()
        self.note(
            "operator", f"changes {member.member}'s payout in its database, leaf {index}: {paid} -> {paid + 9000}"
        )
        with _leaf_rewritten(self.paths.ledger, index, old, new):
            args = f"agent statement --config {self.paths.rel(member.config)}"
            [result] = self.commands([Command(member.member, args, f"statement-{member.member}-tampered")], False)
        refused = "refused" if result.returncode == 1 and "statement refused" in result.stdout else "printed"
        self.outcomes.expect(f"{member.member}'s agent, shown a changed payout", "refused", refused)
        self.note("operator", "restores the leaf")

    # --- 7. audit ----------------------------------------------------------------------------------------------

    def audit(self) -> None:
        self.step("7. Anyone audits the whole log with the MID's public key")
        self.command("auditor", f"ledger verify {self.paths.rel(self.paths.ledger)} --vkey mid.vkey")

    # --- after the processes: summary and accuracy ---------------------------------------------------------------

    def summary(self, statements: dict[str, bool]) -> Summary:
        return summarise(LedgerFacts.read(self.paths.ledger), JOB, self.households, self.devices, statements)

    def accuracy(self) -> dict[str, object]:
        """The job's model beside central training on the same windows, and what the shorter budget costs."""
        self.step("9. Accuracy on the buyer's validation windows (PLAID's 537 test recordings)")
        outcome = self.job_record["outcome"]
        assert isinstance(outcome, dict)
        federated = float(outcome["final_validation"]["accuracy"])
        recipe = TASK.recipe
        same, full = self._central([self.rounds * recipe.local_epochs, recipe.rounds * recipe.local_epochs])
        table = Table("model", "trained on", "accuracy")
        table.add_row(f"federated: this job, {self.rounds} rounds", "the households' devices", f"{federated:.3f}")
        for result, budget in ((same, "the same budget"), (full, "the recipe's budget")):
            table.add_row(
                f"central: {result.epochs} epochs, {budget}",
                f"the same {result.windows} windows, pooled",
                f"{result.accuracy:.3f}",
            )
        table.add_row(
            f"federated: the recipe's {recipe.rounds} rounds",
            "5 devices (BENCHMARKS.md)",
            f"{RECIPE_MEASURED[0]:.3f}-{RECIPE_MEASURED[1]:.3f}",
        )
        self.console.print(table)
        self.console.print(
            f"The shorter budget: {self.rounds} of the recipe's {recipe.rounds} rounds (the final model the mean of "
            f"the last {tail_for(self.rounds)}, the recipe's share), so that `make demo` fits in four minutes. It "
            f"costs accuracy: this model is {(full.accuracy - federated) * 100:.1f} points below central training "
            f"at the recipe's budget, where the full recipe measured a mean {RECIPE_GAP_POINTS} points below central "
            f"(BENCHMARKS.md). `midgate demo --rounds {recipe.rounds}` runs the recipe's budget (its rounds take "
            "about 6 s each here).",
        )
        return {
            "federated": federated,
            "rounds": self.rounds,
            "central_same_budget": asdict(same),
            "central_recipe_budget": asdict(full),
        }

    def job_report(self, accuracy: dict[str, object]) -> Path:
        """The operator writes the job's HTML report (`job report`), with the central baseline at the same budget
        beside the job's accuracy curve; returns its path."""
        self.step("10. The job's report, one HTML file to open in any browser (no network needed)")
        same = accuracy["central_same_budget"]
        assert isinstance(same, dict)
        path = self.paths.root / "job-report.html"
        label = f"central-training-{same['epochs']}-epochs"
        args = (
            f"coordinator job report {JOB} --html {self.paths.rel(path)} --baseline-accuracy {same['accuracy']:.6f} "
            f"--baseline-label {label} --config coordinator.toml"
        )
        self.command("operator", args, quiet=True)
        self.outcomes.expect("the job report written", True, path.exists())
        self.console.print(f"job report: {path}", soft_wrap=True)
        return path

    def _central(self, epochs: list[int]) -> list[CentralResult]:
        """The central baseline on the windows the job's devices trained on (each one's window file for the job)."""
        job = LedgerFacts.read(self.paths.ledger).job(JOB)
        assert job is not None
        trained = {d.device for d in job.devices if d.selected}
        files = [
            h.data_dir / "mids" / MID / "jobs" / JOB / "windows.npz"
            for h in self.households
            if self.devices[h.member] in trained
        ]
        return [train_central(TASK, files, self.paths.validation, e) for e in epochs]


def _log_name(args: str) -> str:
    """The command's words before its first argument: `coordinator-job-settle`."""
    words: list[str] = []
    for word in args.split()[:3]:
        if not re.fullmatch(r"[a-z][a-z-]*", word) or word == JOB:
            break
        words.append(word)
    return "-".join(words)


def _http_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v1/info", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _agent_ready(agent: Service, store: Path) -> bool:
    """The agent has loaded its replay into its store (the store's health table says so) and logged that it is
    connected to its MID's broker, subscribed; or it exited."""
    from edge.sensors.errors import MalformedError

    if not agent.alive:
        return True
    if not store.exists() or " midgate.agent connected" not in agent.log_tail(100_000):
        return False
    try:
        with SampleStore(store, readonly=True) as opened:
            return any(h.state == "loaded" for h in opened.health())
    except MalformedError:
        return False


def _mid_heard(registry_file: Path, devices: dict[str, str], paused: Household, striker: Household) -> bool:
    """The registry `serve` keeps has heard a heartbeat from every device, `paused`'s saying paused, and holds
    `striker`'s logged vote: what `coordinator devices` and `job start` read."""
    from coordinator.registry.store import Registry
    from protocol.messages import DeviceStatus

    registry = Registry(registry_file)
    try:
        heard, votes = registry.presence(), registry.strike_votes()
    finally:
        registry.close()
    return (
        all(device in heard for device in devices.values())
        and heard[devices[paused.member]].status is DeviceStatus.PAUSED
        and any(v.device_id == devices[striker.member] for v in votes)
    )


def _witnessed_size(url: str) -> int:
    """The size of the MID's latest checkpoint a quorum of its members' agents cosigned (-1: none yet)."""
    from protocol.checkpoint import parse_checkpoint_text
    from protocol.note import parse_note

    try:
        with urllib.request.urlopen(f"{url}/v1/checkpoint/witnessed", timeout=5) as response:
            return parse_checkpoint_text(parse_note(response.read()).text).size
    except OSError:
        return -1


@contextlib.contextmanager
def _leaf_rewritten(ledger: Path, index: int, old: bytes, new: bytes) -> Iterator[None]:
    """The ledger file with leaf `index`'s bytes `old` replaced by `new` while the body runs, then restored: an
    operator editing its own database behind the log's back."""
    db = sqlite3.connect(ledger, timeout=30)
    try:
        (data,) = db.execute("SELECT data FROM leaves WHERE idx = ?", (index,)).fetchone()
        if old not in bytes(data):
            raise DemoStepError(f"leaf {index} does not hold {old.decode()}")
        with db:
            db.execute("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data).replace(old, new), index))
        try:
            yield
        finally:
            with db:
                db.execute("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data), index))
    finally:
        db.close()


def ledger_checks(facts: LedgerFacts, summary: Summary, outcomes: Outcomes) -> None:
    """What must hold in the ledger after the demo, each stated as expected and found."""
    job = facts.job(JOB)
    if job is None or job.run_id is None:
        outcomes.expect(f"a JOB leaf for {JOB}", "present", "missing")
        return
    owed: dict[str, int] = {}
    for _, record in facts.rounds:
        for update in record.updates if record.job_id == JOB else ():
            owed[update.device] = owed.get(update.device, 0) + 1
    logged = facts.contributions_of(job.run_id)
    outcomes.expect("one report logged per captured update", sorted(owed.items()), sorted(logged.items()))
    seqs = [(device, report.seq) for _, device, report in facts.contributions]
    outcomes.expect("no (device, seq) logged twice", len(seqs), len(set(seqs)))
    for m in summary.members:
        if Role(m.role).sits_out:
            outcomes.expect(
                f"{m.member} ({m.role}) trained, reported",
                "no, 0",
                f"{'yes' if m.trained else 'no'}, {m.contributions}",
            )
    for label, split in (("settlement", summary.settlement), ("royalty", summary.royalty)):
        if split is None:
            outcomes.expect(f"a {label} leaf for {JOB}", "present", "missing")
            continue
        total = split.fee_minor + split.members_minor + split.unallocated_minor
        outcomes.expect(f"{label}: fee + members + unallocated = payment", split.payment_minor, total)
        outcomes.expect(
            f"{label}: members get at least 70 %", True, split.members_minor * 10 >= split.payment_minor * 7
        )


def run_demo(workdir: Path, console: Console, rounds: int, broker: str) -> bool:
    """Every step in `workdir`, every process stopped at the end (also on Ctrl-C and SIGTERM, which the caller turns
    into KeyboardInterrupt); True when every outcome was the expected one."""
    started = time.monotonic()
    paths = DemoPaths(workdir)
    paths.logs.mkdir(parents=True, exist_ok=True)
    plan = BrokerPlan.choose(broker)
    if plan.kind is BrokerKind.EMBEDDED:
        why = "--broker embedded" if find_mosquitto() else "Mosquitto is not installed"
        console.print(
            f"[bold yellow]{why}: this run uses an EMBEDDED broker (amqtt) instead, with no TLS, logins or ACLs[/] "
            "(`sudo apt-get install mosquitto` installs Mosquitto, as `make demo` does)"
        )
    processes = Processes(workdir, paths.logs)
    demo = DemoRun(paths, console, processes, rounds, plan)
    statements: dict[str, bool] = {}
    try:
        demo.start_mid()
        demo.join_members()
        demo.pause_and_strike()
        demo.run_job()
        demo.wait_for_reports()
        demo.settle()
        statements = demo.members_check()
        demo.audit()
    finally:
        _stop_everything(demo)
    demo.step("8. What the ledger holds")
    summary = demo.summary(statements)
    ledger_checks(LedgerFacts.read(paths.ledger), summary, demo.outcomes)
    summary.show(console, "EUR")
    _free_rider_note(summary, demo.households, console)
    summary.accuracy = demo.accuracy()
    summary.write(workdir / "summary.json")
    demo.job_report(summary.accuracy)
    show_scope(console, plan.kind, statements_checked=bool(statements))
    elapsed = time.monotonic() - started
    failed = demo.outcomes.failed
    if failed:
        console.print(f"[bold red]{len(failed)} outcome(s) differed[/] ({elapsed:.0f} s):")
        for outcome in failed:
            console.print(f"  {outcome.step}: expected {outcome.expected}, got {outcome.got}", markup=False)
        return False
    console.print(f"[bold green]every outcome as expected[/] ({len(demo.outcomes.steps)} checks, {elapsed:.0f} s)")
    return True


def _free_rider_note(summary: Summary, households: list[Household], console: Console) -> None:
    """What the planted free rider got, beside what it brought and what the screens made of it."""
    trained = [h for h in households if not h.role.sits_out]
    pool = summary.settlement.members_minor if summary.settlement else 0
    for h, line in zip(households, summary.members, strict=True):
        if h.role is Role.FREE_RIDER and pool:
            share = len(h.series) / sum(len(t.series) for t in trained)
            screened = (
                f"screens ({', '.join(line.screens)}) excluded it in {line.excluded_rounds} of its "
                f"{line.valued_rounds} rounds"
                if line.screens
                else "no screen flagged it"
            )
            console.print(
                f"{h.member}, the planted free rider, brought {len(h.series)} recordings ({share:.0%} of the job's) "
                f"and was paid {line.settlement_minor / pool:.0%} of the members' share: {screened}, and a member "
                "excluded in at most half its rounds is paid for the value measured in the rounds it was not "
                "excluded from (docs/attribution.md, section 2)."
            )


def _stop_everything(demo: DemoRun) -> None:
    """Stop every process the demo started; a second Ctrl-C cannot cut this short."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        demo.step("Stopping every process the demo started")
        demo.processes.stop_all(lambda line: demo.console.print(f"              {line}"))
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
