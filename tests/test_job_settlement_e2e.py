"""A job ends in attribution and a settlement, on real processes: Mosquitto + `coordinator serve` (its SuperLink, its
buyer API) + 3 enrolled `agent run`s replaying PLAID. `midgate coordinator job start` runs a job with only a task,
its rounds and the devices' defaults (attribution on: the task's recipe), `serve` logs it as a JOB leaf and a ROUND
leaf per round (from which `midgate ledger recompute-job` reproduces the JOB leaf's attribution), `midgate
coordinator job settle` records the buyer's payment and `serve` appends its SETTLEMENT leaf, `job show` prints the
model version, and a buyer's signed revenue report for that version is split as a ROYALTY leaf while one for an
unknown version is refused `unknown_model`. `serve` logged its policy as the first POLICY leaf; `midgate coordinator
job manifest` issues the job's signed provenance manifest, the real `midgate buyer verify-model` verifies it
offline with only the MID's key and refuses another model file, and a revenue report naming the model by its manifest
(`manifest:<sha256>`) is split by the same attribution.

The members' side of the same money: a member who turns its knob (`agent knob set`) while the job runs is paid at
the knob the job started with, and the buyer's next quote (`buyer job request`, `buyer job quote`) prices it at the
new one; a member who leaves (`agent leave`) before the revenue reports is still paid its royalty share, and its
`agent portfolio` shows its settlement and royalty lines verified against the witnessed log with their sum as the
total, and refuses the membership (counting nothing) once one of its lines is changed in the MID's database."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from typing import Any

import pytest
from fl_stack import (
    finished_job,
    job_run_dir,
    midgate,
    start_federated_coordinator,
    start_job,
    start_plaid_agents,
    stopping_federation,
)
from mqtt_fixtures import PYTHON, REPO, AgentHandle, MessagingStack, wait_until

from coordinator.capture.directory import CaptureDirectory
from coordinator.ledger.store import LedgerReader
from coordinator.registry.store import Registry
from coordinator.royalties.settlement import decode_record
from protocol.identity import load_signer_key
from protocol.job_log import decode_job_record, decode_round_record
from protocol.leaves import LeafKind, decode_leaf

pytest_plugins = ["mqtt_fixtures"]

JOB = "job-paid"
ROUNDS = 2
PAYMENT = 10_000


def _leaves(stack: MessagingStack, kind: LeafKind) -> list[tuple[int, bytes]]:
    with LedgerReader.open_existing(stack.data_dir / "ledger.sqlite") as reader:
        found = []
        for index, data in reader.leaves(0, reader.size):
            leaf = decode_leaf(data)
            if leaf.kind is kind:
                found.append((index, leaf.signed))
        return found


def _report_revenue(stack: MessagingStack, key: str, model_version: str, seq: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            PYTHON, "-c", "from midgate_cli import app; app()", "buyer", "report-revenue", model_version, "3000",
            "--key", key, "--coordinator", f"http://127.0.0.1:{stack.http_port}", "--mid", stack.mid,
            "--buyer", "acme", "--model-id", "appliance-classifier", "--currency", "EUR",
            "--period-start-ms", "1795000000000", "--period-end-ms", "1797000000000", "--seq", str(seq),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _agent(handle: AgentHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """A member command on the device, as the member types it."""
    argv = [PYTHON, "-c", "from midgate_cli import app; app()", "agent", *args, "--config", str(handle.config)]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)


def _knob_milli(stack: MessagingStack, member: str) -> int | None:
    registry = Registry(stack.data_dir / "registry.sqlite")
    try:
        knob = registry.knobs().get(member)
    finally:
        registry.close()
    return None if knob is None else knob.bias_milli


def _quote(stack: MessagingStack, key: str) -> dict[str, Any]:
    """A new research job of buyer acme through `midgate buyer job request` and `quote`; its quote."""
    buyer = [PYTHON, "-c", "from midgate_cli import app; app()", "buyer", "job"]
    where = ["--key", key, "--buyer", "acme", "--coordinator", f"http://127.0.0.1:{stack.http_port}"]
    spec = ["--task", "plaid-appliance@1", "--purpose", "research", "--min-members", "1"]
    requested = subprocess.run([*buyer, "request", *spec, *where], cwd=REPO, capture_output=True, text=True)
    assert requested.returncode == 0, requested.stderr
    job_id = json.loads(requested.stdout)["job_id"]
    quoted = subprocess.run([*buyer, "quote", job_id, *where], cwd=REPO, capture_output=True, text=True)
    assert quoted.returncode == 0, quoted.stderr
    quote: dict[str, Any] = json.loads(quoted.stdout)["quote"]
    return quote


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_is_valued_logged_settled_and_its_model_version_earns_royalties(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    buyer_key = stack.root / "acme.key"
    acme = midgate("buyer", "keygen", "--key", str(buyer_key), "--name", "acme").strip()
    # start_federated_coordinator's extra goes under [federation]; the tables after it are the MID's money settings.
    start_federated_coordinator(stack, f'[royalties]\nfee_bps = 2000\n[buyers.keys]\nacme = "{acme}"')
    # Witnessing every second: the portfolio below verifies under a witnessed checkpoint of the latest leaves.
    agents = start_plaid_agents(stack, 3, extra="member_poll_s = 0.2\nwitness_every_s = 1.0")
    members = {record.device: handle.name for handle, record in agents}
    m0, m1 = agents[0][0], agents[1][0]  # m1 turns its knob, m0 does not

    with stopping_federation(stack, agents) as teardown:
        job = start_job(stack, teardown, JOB, ROUNDS)
        # m1 turns its knob once the job started: the job keeps the knobs it started with, the next quote does not.
        book_file = stack.data_dir / "federation" / "job-book" / f"{JOB}.json"
        wait_until(lambda: book_file.exists(), 120, "job start to record the job with its members' knobs")
        knob = _agent(m1, "knob", "set", "0.5")
        assert knob.returncode == 0, knob.stderr
        knob_price = re.search(r"your price (\d+) EUR", " ".join(knob.stdout.split()))
        assert knob_price is not None, knob.stdout
        wait_until(lambda: _knob_milli(stack, m1.name) == 500, 60, "serve to log m1's knob", poll_s=0.5)
        book = finished_job(stack, job, JOB, timeout_s=420)
        assert book.knobs_milli.get(m1.name, 0) == 0, book.knobs_milli
        assert book.request.attribution and book.model_version is not None
        assert book.model_version == f"{JOB}:{book.outcome.final_model_sha256[:16]}"  # type: ignore[union-attr]
        said = job.log_text()
        assert f"model version: {book.model_version}" in said
        assert re.search(r"logged: JOB leaf \d+", said), said[-3000:]
        shown = json.loads(midgate("coordinator", "job", "show", JOB, "--config", str(stack.config)))
        assert shown["model_version"] == book.model_version

        # serve logged the job, and each round as the ServerApp captured it, valued.
        [(job_index, job_body)] = _leaves(stack, LeafKind.JOB)
        logged = decode_job_record(job_body)
        assert (logged.status, logged.model_version, logged.rounds_completed) == ("completed", book.model_version, 2)
        assert {d.device for d in logged.devices} == set(members)
        assert {m.member for m in logged.attribution} == {d.member for d in logged.devices}
        assert logged.same_data_kept == "smaller"  # the settlement rule the ServerApp's account ran, named
        rounds = _leaves(stack, LeafKind.ROUND)
        assert [index for index, _ in rounds] == [job_index + 1, job_index + 2]
        captures = CaptureDirectory(job_run_dir(stack, book))
        for _, body in rounds:
            rnd = decode_round_record(body)
            captured = captures.load_round(rnd.round)
            assert rnd.valuation == "exact" and rnd.global_sha256 == captured.global_sha256
            assert {(u.node_id, u.update_sha256) for u in rnd.updates} == {
                (u.node_id, u.update_sha256) for u in captured.updates
            }
            assert all(u.value_units is not None for u in rnd.updates)
        # Anyone holding the ledger redoes the JOB leaf's attribution from its ROUND leaves (the real command).
        recomputed = midgate("ledger", "recompute-job", JOB, "--db", str(stack.data_dir / "ledger.sqlite"))
        assert recomputed == "ok\n", recomputed

        # The operator records the buyer's payment; serve settles it under the MID's policy.
        settled = midgate(
            "coordinator", "job", "settle", JOB, "--payment", str(PAYMENT), "--currency", "EUR",
            "--config", str(stack.config),
        )  # fmt: skip
        [(settlement_index, settlement_body)] = _leaves(stack, LeafKind.SETTLEMENT)
        assert f"SETTLEMENT leaf {settlement_index}, record settlement-{JOB}" in settled
        assert "manifest issued: manifest:" in settled, settled
        record = decode_record(settlement_body)
        paid = sum(p.amount_minor for p in record.payouts)
        assert record.fee_minor + paid + record.unallocated_minor == PAYMENT
        assert record.fee_minor <= PAYMENT * 3 // 10 and paid >= PAYMENT * 7 // 10
        assert record.inputs.attribution.model_version == book.model_version
        # The running job was priced at the knobs it started with: m1 at 0, its price that of the others.
        knobs = {m.member: m.knob_milli for m in record.inputs.attribution.members}
        prices = {p.member: p.price_minor for p in record.payouts}
        assert knobs[m1.name] == knobs[m0.name] == 0 and prices[m1.name] == prices[m0.name], (knobs, prices)
        # The next quote prices m1 at its new knob, at the price `agent knob set` told it. (Job requests are signed
        # by a buyer the operator registered; [buyers.keys] lists who may report revenue.)
        midgate("coordinator", "buyer", "add", "acme", "--key", acme, "--config", str(stack.config))
        quote = _quote(stack, str(buyer_key))
        assert quote["member_prices"][m1.name] == int(knob_price[1]) > quote["member_prices"][m0.name], quote

        # serve logged the MID's policy when it started: version 1, the fee of [royalties].
        [(_, policy_body)] = _leaves(stack, LeafKind.POLICY)
        assert json.loads(policy_body)["version"] == 1 and json.loads(policy_body)["policy"]["fee_bps"] == 2000
        assert record.inputs.attribution.policy.version == 1

        # The operator issues the job's provenance manifest; the buyer verifies it offline with the MID's key.
        manifest = stack.root / "job-paid.manifest.json"
        issued = midgate("coordinator", "job", "manifest", JOB, "--out", str(manifest), "--config", str(stack.config))
        reference = re.search(r"reference: (manifest:[0-9a-f]{64})", issued)
        assert reference is not None and f"manifest issued: {reference[1]}" in settled, issued  # the one settle issued
        model = job_run_dir(stack, book) / "final-model.npz"
        mid_key = load_signer_key(stack.data_dir / "mid.key").verifier.text()
        verify = [PYTHON, "-c", "from midgate_cli import app; app()", "buyer", "verify-model"]
        ledger = ["--ledger", str(stack.data_dir / "ledger.sqlite")]  # the auditor's copy: the root is recomputed
        verified = subprocess.run(
            [*verify, str(model), str(manifest), "--mid-key", mid_key, *ledger],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert verified.returncode == 0 and "contribution root recomputed" in verified.stdout, verified.stderr
        assert f"settlement leaf {settlement_index}" in verified.stdout and reference[1] in verified.stdout
        assert f"members {len(record.payouts)}:" in verified.stdout
        other = stack.root / "other-model.npz"
        other.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
        refused = subprocess.run(
            [*verify, str(other), str(manifest), "--mid-key", mid_key], cwd=REPO, capture_output=True, text=True
        )
        assert refused.returncode == 1 and "refused: model hash: model_mismatch" in refused.stderr, refused.stderr

        # The member the settlement paid most leaves the MID (its LeaveNotice logged, its key revoked); the model it
        # helped train still pays it. (One its valuation paid at all: a member of no value earns nothing anyway.)
        handles = {handle.name: handle for handle, _ in agents}
        gone = handles[max(record.payouts, key=lambda p: p.amount_minor).member]
        left = _agent(gone, "leave", "--yes")
        assert left.returncode == 0, left.stderr
        wait_until(lambda: _leaves(stack, LeafKind.LEAVE) != [], 60, "serve to log the leave", poll_s=0.5)

        # The buyer reports revenue against the model version; a version no settlement names is refused.
        accepted = _report_revenue(stack, str(buyer_key), book.model_version, seq=1)
        assert accepted.returncode == 0, accepted.stderr
        [(royalty_index, royalty_body)] = _leaves(stack, LeafKind.ROYALTY)
        assert json.loads(accepted.stdout)["index"] == royalty_index
        royalty = decode_record(royalty_body)
        assert royalty.inputs.attribution == record.inputs.attribution
        assert {p.member: p.amount_minor for p in royalty.payouts}[gone.name] > 0  # reported after it left
        unknown = _report_revenue(stack, str(buyer_key), f"{JOB}:0000000000000000", seq=2)
        assert unknown.returncode == 1 and "refused: unknown_model" in unknown.stderr, unknown.stderr
        assert len(_leaves(stack, LeafKind.ROYALTY)) == 1
        by_manifest = _report_revenue(stack, str(buyer_key), reference[1], seq=3)
        assert by_manifest.returncode == 0, by_manifest.stderr
        assert decode_record(_leaves(stack, LeafKind.ROYALTY)[-1][1]).inputs.attribution == record.inputs.attribution

        # The portfolio of the member who left, on its own device: each line verified against the MID's witnessed
        # log, and the total their sum: its share of the settlement and of both royalties, as the ledger pays it.
        earned = {settlement_index: {p.member: p.amount_minor for p in record.payouts}[gone.name]}
        for index, body in _leaves(stack, LeafKind.ROYALTY):
            earned[index] = {p.member: p.amount_minor for p in decode_record(body).payouts}[gone.name]
        last = f"(leaf {max(earned)})"
        wait_until(lambda: last in _agent(gone, "portfolio").stdout, 60, "a witnessed log with its lines", poll_s=1)
        shown = _agent(gone, "portfolio")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        lines = {int(i): int(a) for a, i in re.findall(r": (\d+) EUR minor units \(leaf (\d+)\)", shown.stdout)}
        assert lines == earned, shown.stdout
        assert f"Total across MIDs: {sum(lines.values())} EUR minor units" in shown.stdout, shown.stdout

        # A line changed in the MID's database: the portfolio refuses that membership and counts nothing of it.
        tampered_index = max(earned)
        amount = earned[tampered_index]
        old = f'"amount_minor":{amount},"member":"{gone.name}"'.encode()  # its payout, in the record's sorted keys
        new = f'"amount_minor":{amount + 9},"member":"{gone.name}"'.encode()
        db = sqlite3.connect(stack.data_dir / "ledger.sqlite")
        (data,) = db.execute("SELECT data FROM leaves WHERE idx = ?", (tampered_index,)).fetchone()
        assert old in bytes(data)
        db.execute("UPDATE leaves SET data = ? WHERE idx = ?", (bytes(data).replace(old, new), tampered_index))
        db.commit()
        db.close()
        refused_portfolio = _agent(gone, "portfolio")
        assert refused_portfolio.returncode == 1, refused_portfolio.stdout + refused_portfolio.stderr
        assert "NOT COUNTED, refused:" in refused_portfolio.stdout, refused_portfolio.stdout
        assert refused_portfolio.stdout.endswith("Total across MIDs: nothing verified yet\n"), refused_portfolio.stdout
