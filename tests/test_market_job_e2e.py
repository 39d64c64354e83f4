"""A buyer's job from request to delivered model through `midgate buyer job`, on real processes: Mosquitto +
`coordinator serve` (its SuperLink, its buyer API) + 3 enrolled `agent run`s replaying PLAID. The operator registers
the buyer with `midgate coordinator buyer add` while serve runs; the buyer requests a job with its validation data,
gets a quote, accepts it (ESCROW leaf), follows it over server-sent events until serve has run it, settled it under
the MID's policy (SETTLEMENT leaf) and released the escrow into the settlement (ESCROW_RELEASE leaf), and downloads
the model, whose hash is the job's, and the provenance manifest serve issued, which `buyer verify-model` verifies
offline."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request

import numpy as np
import pytest
from fl_stack import midgate, start_federated_coordinator, start_plaid_agents, stopping_federation
from flower_fixtures import plaid_windows
from mqtt_fixtures import PYTHON, REPO, MessagingStack

from coordinator.ledger.store import LedgerReader
from coordinator.royalties.settlement import decode_record
from protocol.escrow import decode_escrow_record
from protocol.job_log import decode_job_record
from protocol.leaves import LeafKind, decode_leaf
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.spec import get_task
from protocol.tasks.windows import save_window_file

pytest_plugins = ["mqtt_fixtures"]

ROUNDS = 1


def _leaves(stack: MessagingStack) -> dict[LeafKind, list[tuple[int, bytes]]]:
    found: dict[LeafKind, list[tuple[int, bytes]]] = {}
    with LedgerReader.open_existing(stack.data_dir / "ledger.sqlite") as reader:
        for index, data in reader.leaves(0, reader.size):
            leaf = decode_leaf(data)
            found.setdefault(leaf.kind, []).append((index, leaf.signed))
    return found


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_buyer_requests_pays_follows_and_downloads_a_settled_job(messaging_stack: MessagingStack) -> None:
    stack = messaging_stack
    key = stack.root / "acme.key"
    verifier = midgate("buyer", "keygen", "--key", str(key), "--name", "acme-key").strip()
    start_federated_coordinator(stack, "[royalties]\nfee_bps = 2000\n[market]\njoin_timeout_s = 60")
    agents = start_plaid_agents(stack, 3)
    midgate("coordinator", "buyer", "add", "acme", "--key", verifier, "--config", str(stack.config))
    env = {
        **os.environ,
        "MIDGATE_BUYER_KEY": str(key),
        "MIDGATE_BUYER": "acme",
        "MIDGATE_COORDINATOR_URL": f"http://127.0.0.1:{stack.http_port}",
    }

    def buyer(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-c", "from midgate_cli import app; app()", "buyer", "job", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip

    validation = stack.root / "validation.npz"
    save_window_file(validation, plaid_windows("test"))
    with stopping_federation(stack, agents):
        requested = buyer(
            "request", "--task", "plaid-appliance@1", "--purpose", "research", "--rounds", str(ROUNDS),
            "--min-members", "3", "--validation", str(validation), "--idempotency-key", "order-1",
        )  # fmt: skip
        assert requested.returncode == 0, requested.stderr
        job_id = json.loads(requested.stdout)["job_id"]
        quoted = buyer("quote", job_id)
        assert quoted.returncode == 0, quoted.stderr
        quote = json.loads(quoted.stdout)["quote"]
        assert len(quote["members"]) == 3 and quote["total_minor"] == quote["members_minor"] + quote["fee_minor"]
        accepted = buyer("accept", job_id)
        assert accepted.returncode == 0, accepted.stderr
        assert json.loads(accepted.stdout)["state"] in ("accepted", "running")

        followed = buyer("follow", job_id, timeout_s=240)
        assert followed.returncode == 0, followed.stdout + followed.stderr
        lines = followed.stdout.splitlines()
        assert lines[-1].startswith(f"{job_id}: delivered, round {ROUNDS}/{ROUNDS}, 3 member(s), accuracy"), lines
        assert any(": running" in line for line in lines), lines

        shown = json.loads(buyer("status", job_id).stdout)
        assert shown["state"] == "delivered" and shown["progress"]["accuracy"] is not None
        model = stack.root / "model.npz"
        downloaded = buyer("download", job_id, "-o", str(model))
        assert downloaded.returncode == 0, downloaded.stderr
        with np.load(model) as arrays:
            assert arrays_sha256({name: arrays[name] for name in arrays.files}) == shown["model_sha256"]
        # The provenance manifest serve issued at delivery, verified offline with only the MID's key.
        assert shown["manifest"] is True, shown["reason"]
        manifest = stack.root / "model.manifest.json"
        fetched = buyer("manifest", job_id, "-o", str(manifest))
        assert fetched.returncode == 0, fetched.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.http_port}/v1/info", timeout=10) as info:
            mid_key = json.loads(info.read())["mid_key"]
        verify = [PYTHON, "-c", "from midgate_cli import app; app()", "buyer", "verify-model"]
        verified = subprocess.run(
            [*verify, str(model), str(manifest), "--mid-key", mid_key], cwd=REPO, capture_output=True, text=True
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        other = stack.root / "other.npz"
        with np.load(model) as arrays:
            np.savez(other, **{name: arrays[name] + 1 for name in arrays.files})
        refused = subprocess.run(
            [*verify, str(other), str(manifest), "--mid-key", mid_key], cwd=REPO, capture_output=True, text=True
        )
        assert refused.returncode == 1 and "model_mismatch" in refused.stdout + refused.stderr

        # A task the buyer proposes with its request: quoted once the operator approves it through `task approve`.
        spec = get_task("plaid-appliance", 1).model_dump(mode="json")
        spec.update(id="acme-appliance", description="acme's appliance classes")
        spec_file = stack.root / "acme-appliance.json"
        spec_file.write_text(json.dumps(spec))
        proposed = buyer(
            "request", "--task", "acme-appliance@1", "--purpose", "research", "--task-spec", str(spec_file)
        )
        assert proposed.returncode == 0, proposed.stderr
        proposed_id = json.loads(proposed.stdout)["job_id"]
        assert buyer("quote", proposed_id).returncode != 0  # awaits the operator's approval
        task = ["coordinator", "task"]
        assert proposed_id in midgate(*task, "proposals", "--config", str(stack.config))
        assert "approved: acme-appliance@1" in midgate(*task, "approve", proposed_id, "--config", str(stack.config))
        requoted = buyer("quote", proposed_id)
        assert requoted.returncode == 0, requoted.stderr

        # The money: escrow in, the job settled under the policy for exactly the escrowed amount, escrow released.
        leaves = _leaves(stack)
        [(escrow_index, escrow_body)] = leaves[LeafKind.ESCROW]
        [(job_index, job_body)] = leaves[LeafKind.JOB]
        [(settlement_index, settlement_body)] = leaves[LeafKind.SETTLEMENT]
        [(release_index, release_body)] = leaves[LeafKind.ESCROW_RELEASE]
        assert LeafKind.REFUND not in leaves
        assert escrow_index < job_index < settlement_index < release_index
        deposit, release = decode_escrow_record(escrow_body), decode_escrow_record(release_body)
        settlement = decode_record(settlement_body)
        assert deposit.amount_minor == quote["total_minor"] == settlement.inputs.payment_minor
        assert (release.settlement_index, release.amount_minor) == (settlement_index, deposit.amount_minor)
        assert settlement.inputs.attribution.model_version == shown["model_version"]
        assert decode_job_record(job_body).buyer == "acme"
        assert settlement.fee_minor <= deposit.amount_minor * 2000 // 10_000
        # What the operator's `ledger show` says of the leaves: the job, its escrow in and out.
        listed = midgate("ledger", "show", str(stack.data_dir / "ledger.sqlite"), "--count", "1000").splitlines()
        about = {int(line.split("\t")[0]): line.split("\t")[4] for line in listed if line.count("\t") == 4}
        total = f"{deposit.amount_minor} {deposit.currency}"
        assert about[escrow_index] == f"job {job_id} deposit {total} by acme"
        assert about[release_index] == f"job {job_id} release {total} by acme into leaf {settlement_index}"
        assert about[job_index].startswith(f"job {job_id} completed, ")
        ledger = shown["ledger"]
        assert (ledger["escrow"], ledger["settlement"], ledger["release"]) == (
            escrow_index,
            settlement_index,
            release_index,
        )
