"""The buyer job API on the app `serve` builds, with real SQLite storage, real Ed25519 signatures and the real ledger:
request, validation upload, quote and accept; who may do what (a buyer sees and acts on its own jobs only; unsigned,
badly signed, unknown, revoked, stale and replayed requests refused with their reasons); idempotent requests; bad
input answered 4xx with a message; and a job that fails after acceptance refunds its escrow in the ledger."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from market_fixtures import TASK, Buyer, Market, market, now_ms, validation_bytes

from coordinator.market.http import authenticate
from coordinator.market.models import Escrow
from coordinator.market.store import MARK_STEP_MS, MarketStore
from coordinator.royalties.quote import quote_job
from protocol.buyer_request import MAX_SKEW_MS, SIGNATURE_HEADER, BuyerRequestStatement
from protocol.envelope import decode, open_envelope
from protocol.errors import ReplayedError
from protocol.escrow import decode_escrow_record
from protocol.identity import SignerKey
from protocol.leaves import LeafKind, decode_leaf

__all__ = ["market"]  # the fixture, imported for pytest


def _leaves(m: Market, kind: LeafKind) -> list[tuple[int, bytes]]:
    found = []
    for index, data in m.ledger.leaves(0, m.ledger.size):
        leaf = decode_leaf(data)
        if leaf.kind is kind:
            found.append((index, leaf.signed))
    return found


def _refused(response: object, status: int, reason: str) -> None:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["reason"] == reason and body["message"], body


def test_a_quote_prices_the_eligible_members_under_the_mids_policy(market: Market, tmp_path: Path) -> None:
    job = market.quoted_job(market.acme, tmp_path, min_members=2, max_members=2)
    quote = job["quote"]
    assert job["state"] == "quoted" and quote["members"] == ["ann", "bob"]  # at most max_members, in a stable order
    expected = quote_job({"ann": 0, "bob": 0}, market.settings.royalties.policy())
    assert (quote["members_minor"], quote["fee_minor"], quote["total_minor"]) == (
        expected.members_minor,
        expected.fee_minor,
        expected.total_minor,
    )
    assert quote["devices"] == ["d-ann", "d-bob"] and quote["currency"] == "EUR"
    assert job["validation_sha256"] == hashlib.sha256(validation_bytes(tmp_path)).hexdigest()
    # The rounds left out come from the task's recipe.
    assert job["request"]["rounds"] >= 1


def test_a_paused_member_is_not_quoted_and_too_few_members_is_refused(market: Market, tmp_path: Path) -> None:
    from coordinator.registry.presence import Presence
    from protocol.messages import DeviceStatus

    now = now_ms()
    market.registry.record_presence([Presence("d-bob", DeviceStatus.PAUSED, now, now, False)])
    job = market.quoted_job(market.acme, tmp_path)
    assert job["quote"]["members"] == ["ann", "cy"]
    made = market.call(market.acme, "POST", "/v1/jobs", {"task": TASK, "purpose": "research", "min_members": 3})
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{made.json()['job_id']}/quote"), 409, "job_state")


def test_a_quote_prices_each_member_at_its_logged_knob_and_leaves_out_members_whose_consent_excludes_the_job(
    market: Market, tmp_path: Path
) -> None:
    from coordinator.registry.member_choices import ConsentRecord, KnobSetting

    market.registry.record_knob(KnobSetting("ann", 500, leaf_index=7, device_time_ms=now_ms()))
    market.registry.record_consent(ConsentRecord("cy", None, ("acme",), leaf_index=8))
    quote = market.quoted_job(market.acme, tmp_path)["quote"]
    assert quote["members"] == ["ann", "bob"]
    expected = quote_job({"ann": 500, "bob": 0}, market.settings.royalties.policy())
    assert quote["member_prices"] == expected.member_prices and quote["total_minor"] == expected.total_minor
    assert quote["member_prices"]["ann"] > quote["member_prices"]["bob"]
    # cy denied acme only: globex's job may have it.
    assert market.quoted_job(market.globex, tmp_path)["quote"]["members"] == ["ann", "bob", "cy"]
    # bob lets the job's task train on bme280 data only, no source of its inputs: no longer quoted.
    from protocol.messages import TaskSensors

    task_id = TASK.split("@")[0]
    narrowed = (TaskSensors(task_id=task_id, sensors=("bme280",)),)
    market.registry.record_consent(ConsentRecord("bob", None, (), leaf_index=9, task_sensors=narrowed))
    assert market.quoted_job(market.globex, tmp_path)["quote"]["members"] == ["ann", "cy"]


def test_members_below_the_policys_reputation_minimum_for_the_jobs_class_are_not_quoted(
    market: Market, tmp_path: Path
) -> None:
    from coordinator.policy.reputation import LoggedReputation
    from protocol.job_log import JobDeviceEntry, JobLogRecord, MemberValue
    from protocol.leaves import Leaf, LeafKind

    terms = 'dpv = "dpv:ResearchAndDevelopment"\nlabel = "x"\nlicence = "y"'
    market.settings.policy_path.write_text(
        "fee_bps = 1500\n[knob]\nbase_price_minor = 1000\nalpha_milli = 693\nmin_price_minor = 100\n"
        "max_price_minor = 100000\n[reputation]\nmin_milli = { default = 0, health = 600 }\n"
        f'[[purposes]]\ncode = "research"\n{terms}\n[[purposes]]\ncode = "health"\n{terms}\n'
    )
    assert market.desk.policies is not None
    market.desk.policies.sync()  # serve logs the changed policy file as a POLICY leaf
    # A logged job: ann valued in 10 rounds, bob excluded from 3 of his 4; cy has no logged job (500).
    job = JobLogRecord(
        job_id="job-old", run_id=1, task_id="plaid-appliance", task_version=1, purpose="research", buyer="globex",
        status="failed", rounds=10, rounds_completed=10, started_ms=now_ms() - 9, ended_ms=now_ms(),
        devices=tuple(JobDeviceEntry(device=f"d-{m}", member=m, node_id=i, selected=True) for i, m in enumerate("ab")),
        attribution=(
            MemberValue(member="ann", value_units=900, rounds=10, excluded_rounds=0),
            MemberValue(member="bob", value_units=100, rounds=4, excluded_rounds=3),
        ),
    )  # fmt: skip
    market.ledger.append_leaves([Leaf(LeafKind.JOB, job.canonical_json())])
    scores = LoggedReputation(market.ledger).scores(["ann", "bob", "cy"])
    assert scores["ann"] > 600 > scores["cy"] == 500 > scores["bob"], scores
    # A health job quotes ann alone; a research job (the default class, minimum 0) all three.
    assert market.quoted_job(market.acme, tmp_path, purpose="health", min_members=1)["quote"]["members"] == ["ann"]
    assert market.quoted_job(market.acme, tmp_path)["quote"]["members"] == ["ann", "bob", "cy"]
    made = market.call(market.acme, "POST", "/v1/jobs", {"task": TASK, "purpose": "health", "min_members": 2})
    refused = market.call(market.acme, "POST", f"/v1/jobs/{made.json()['job_id']}/quote")
    _refused(refused, 409, "job_state")
    assert "2 below the policy's minimum reputation for a 'health' job" in refused.json()["message"]


def test_a_quote_is_refused_with_strike_while_a_strike_at_quorum_covers_the_buyer(
    market: Market, tmp_path: Path
) -> None:
    from coordinator.registry.presence import StrikeVoteRecord

    def vote(index: int, device: str, withdraw: bool = False) -> StrikeVoteRecord:
        return StrikeVoteRecord(index, device, "acme", None, now_ms() - 1_000, None, withdraw)

    # One striker of three is below the policy's quorum: acme is quoted, without the striker.
    market.registry.record_strike_votes([vote(20, "d-cy")])
    assert market.quoted_job(market.acme, tmp_path)["quote"]["members"] == ["ann", "bob"]
    market.registry.record_strike_votes([vote(21, "d-ann"), vote(22, "d-bob")])
    made = market.call(market.acme, "POST", "/v1/jobs", {"task": TASK, "purpose": "research"}).json()
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{made['job_id']}/quote"), 409, "strike")
    assert market.call(market.acme, "GET", f"/v1/jobs/{made['job_id']}").json()["state"] == "requested"
    # The strike is against acme only.
    assert market.quoted_job(market.globex, tmp_path)["quote"]["members"] == ["ann", "bob", "cy"]


def test_unsigned_bad_unknown_stale_and_replayed_requests_are_refused_with_their_reasons(market: Market) -> None:
    client, acme = market.client, market.acme
    _refused(client.get("/v1/jobs"), 401, "unsigned")
    _refused(client.get("/v1/jobs", headers={SIGNATURE_HEADER: "not base64!"}), 400, "malformed")
    # Signed for another body, path or method: the signature does not cover this request.
    body = json.dumps({"task": TASK, "purpose": "research"}).encode()
    lifted = acme.headers("POST", "/v1/jobs", body)
    _refused(client.post("/v1/jobs", content=body + b" ", headers=lifted), 403, "bad_signature")
    _refused(client.get("/v1/jobs", headers=acme.headers("GET", "/v1/jobs?all=1")), 403, "bad_signature")
    _refused(client.get("/v1/jobs", headers=acme.headers("POST", "/v1/jobs")), 403, "bad_signature")
    # A key the MID never registered, even under a registered buyer's name.
    stranger = Buyer("acme", SignerKey.generate("acme"))
    _refused(client.get("/v1/jobs", headers=stranger.headers("GET", "/v1/jobs")), 403, "unknown_key")
    # Signed too long ago (or ahead).
    old = acme.headers("GET", "/v1/jobs", at_ms=now_ms() - MAX_SKEW_MS - 5_000)
    _refused(client.get("/v1/jobs", headers=old), 403, "stale_request")
    # The same signed request twice: the second is a replay.
    once = acme.headers("GET", "/v1/jobs")
    assert client.get("/v1/jobs", headers=once).status_code == 200
    _refused(client.get("/v1/jobs", headers=once), 409, "replayed")
    # Another buyer's key signing a statement that names acme.
    envelope = BuyerRequestStatement(
        buyer="acme", method="GET", target="/v1/jobs", body_sha256=hashlib.sha256(b"").hexdigest(),
        issued_ms=now_ms(), nonce="n" * 20,
    ).seal(market.globex.key)  # fmt: skip
    forged = {SIGNATURE_HEADER: base64.b64encode(envelope).decode()}
    _refused(client.get("/v1/jobs", headers=forged), 403, "bad_signature")
    assert [str(r) for r in market.refusals] == [
        "unsigned", "malformed", "bad_signature", "bad_signature", "bad_signature", "unknown_key", "stale_request",
        "replayed", "bad_signature",
    ]  # fmt: skip


def test_a_request_used_before_a_restart_is_refused_after_it_and_a_fresh_one_is_served(
    market: Market, tmp_path: Path
) -> None:
    """Nonces live in memory only (coordinator/market/store.py): what keeps a replay out after a restart is the
    buyer's durable request mark, moved past every accepted statement before it is acted on."""
    acme = market.acme
    used, unsent = acme.headers("GET", "/v1/jobs"), acme.headers("GET", "/v1/jobs", at_ms=now_ms() + 2_000)
    assert market.client.get("/v1/jobs", headers=used).status_code == 200
    # Signed ahead of the coordinator's clock (within the window): its mark is moved past it too.
    ahead = acme.headers("GET", "/v1/jobs", at_ms=now_ms() + 60_000)
    assert market.client.get("/v1/jobs", headers=ahead).status_code == 200
    restarted = MarketStore(market.settings.market_path)  # what serve opens when it starts again
    try:
        for headers in (used, ahead, unsent):  # unsent: signed before the restart, never used, refused all the same
            with pytest.raises(ReplayedError):
                authenticate(restarted, "GET", "/v1/jobs", headers[SIGNATURE_HEADER], b"")
        fresh = acme.headers("GET", "/v1/jobs", at_ms=now_ms() + 60_000 + MARK_STEP_MS + 1)
        assert authenticate(restarted, "GET", "/v1/jobs", fresh[SIGNATURE_HEADER], b"").buyer == "acme"
        with pytest.raises(ReplayedError):
            authenticate(restarted, "GET", "/v1/jobs", fresh[SIGNATURE_HEADER], b"")
        # globex, who sent nothing before, is not held back by acme's mark.
        assert (
            authenticate(
                restarted, "GET", "/v1/jobs", market.globex.headers("GET", "/v1/jobs")[SIGNATURE_HEADER], b""
            ).buyer
            == "globex"
        )
    finally:
        restarted.close()


def test_a_store_that_kept_nonces_in_a_table_carries_them_into_the_request_marks(tmp_path: Path) -> None:
    path = tmp_path / "market.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE nonces (buyer TEXT NOT NULL, nonce TEXT NOT NULL, issued_ms INTEGER NOT NULL,"
        " PRIMARY KEY (buyer, nonce)); INSERT INTO nonces VALUES ('acme', 'a', 5), ('acme', 'b', 9), ('bo', 'c', 7);"
    )
    old.commit()
    old.close()
    store = MarketStore(path)
    store.close()
    db = sqlite3.connect(path)
    assert sorted(db.execute("SELECT * FROM request_marks")) == [("acme", 9), ("bo", 7)]
    assert not db.execute("SELECT 1 FROM sqlite_master WHERE name='nonces'").fetchone()
    db.close()


def _cli(market: Market, *args: str, group: str = "buyer") -> subprocess.CompletedProcess[str]:
    config = market.settings.data_dir.parent / "coordinator.toml"
    config.write_text(f'mid = "riverside"\ndata_dir = "{market.settings.data_dir}"\n')
    return subprocess.run(
        [sys.executable, "-c", "from midgate_cli import app; app()", "coordinator", group, *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_buyer_added_or_revoked_by_the_operator_counts_from_the_next_request(market: Market) -> None:
    initech = Buyer("initech", SignerKey.generate("initech-key"))
    _refused(market.client.get("/v1/jobs", headers=initech.headers("GET", "/v1/jobs")), 403, "unknown_key")
    added = _cli(market, "add", "initech", "--key", initech.key.verifier.text())
    assert added.returncode == 0, added.stderr
    assert market.client.get("/v1/jobs", headers=initech.headers("GET", "/v1/jobs")).json() == {"jobs": []}
    again = _cli(market, "add", "initech2", "--key", initech.key.verifier.text())
    assert again.returncode == 1 and "registered already" in again.stderr
    revoked = _cli(market, "revoke", "initech")
    assert revoked.returncode == 0, revoked.stderr
    _refused(market.client.get("/v1/jobs", headers=initech.headers("GET", "/v1/jobs")), 403, "revoked_key")
    listed = _cli(market, "list")
    assert listed.returncode == 0 and "initech\t" in listed.stdout


def test_a_buyer_cannot_see_or_act_on_another_buyers_job(market: Market, tmp_path: Path) -> None:
    job = market.quoted_job(market.acme, tmp_path)
    job_id, globex = job["job_id"], market.globex
    accept = {"quote_sha256": job["quote_sha256"], "amount_minor": job["quote"]["total_minor"]}
    for method, target, body in [
        ("GET", f"/v1/jobs/{job_id}", b""),
        ("GET", f"/v1/jobs/{job_id}/events", b""),
        ("GET", f"/v1/jobs/{job_id}/model", b""),
        ("GET", f"/v1/jobs/{job_id}/manifest", b""),
        ("POST", f"/v1/jobs/{job_id}/quote", b""),
        ("POST", f"/v1/jobs/{job_id}/accept", json.dumps(accept).encode()),
        ("POST", f"/v1/jobs/{job_id}/cancel", b""),
        ("POST", f"/v1/jobs/{job_id}/validation", validation_bytes(tmp_path)),
    ]:
        _refused(market.call(globex, method, target, body), 404, "unknown_job")
    assert market.call(globex, "GET", "/v1/jobs").json() == {"jobs": []}
    assert [j["job_id"] for j in market.call(market.acme, "GET", "/v1/jobs").json()["jobs"]] == [job_id]
    assert market.call(market.acme, "GET", f"/v1/jobs/{job_id}").json()["state"] == "quoted"  # nothing changed
    assert _leaves(market, LeafKind.ESCROW) == []


def test_a_request_repeated_under_its_idempotency_key_is_the_same_job(market: Market) -> None:
    body = {"task": TASK, "purpose": "research"}
    first = market.call(market.acme, "POST", "/v1/jobs", body, {"Idempotency-Key": "order-1"})
    again = market.call(market.acme, "POST", "/v1/jobs", body, {"Idempotency-Key": "order-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["job_id"] == first.json()["job_id"]
    other = market.call(market.acme, "POST", "/v1/jobs", {**body, "rounds": 3}, {"Idempotency-Key": "order-1"})
    _refused(other, 409, "idempotency_mismatch")
    # Keys are per buyer: globex's "order-1" is its own job.
    theirs = market.call(market.globex, "POST", "/v1/jobs", body, {"Idempotency-Key": "order-1"})
    assert theirs.status_code == 201 and theirs.json()["job_id"] != first.json()["job_id"]
    assert len(market.call(market.acme, "GET", "/v1/jobs").json()["jobs"]) == 1


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"{not json", 400, "malformed"),
        (b"[]", 400, "malformed"),
        ({"task": TASK}, 400, "malformed"),
        ({"task": TASK, "purpose": "research", "extra": 1}, 400, "malformed"),
        ({"task": TASK, "purpose": "research", "min_members": 5, "max_members": 2}, 400, "malformed"),
        ({"task": TASK, "purpose": "Research!"}, 400, "malformed"),
        ({"task": "no-such-task@1", "purpose": "research"}, 404, "unknown_task"),
        ({"task": TASK, "purpose": "advertising"}, 422, "policy_violation"),  # not in the MID's purpose vocabulary
        ({"task": TASK, "purpose": "research", "rounds": 0}, 400, "malformed"),
        (b"x" * 60_000, 413, "too_large"),
    ],
)
def test_a_bad_job_request_is_a_4xx_with_a_message(
    market: Market, body: bytes | dict[str, object], status: int, reason: str
) -> None:
    _refused(market.call(market.acme, "POST", "/v1/jobs", body), status, reason)
    assert market.store.job_ids() == []


def test_steps_out_of_order_or_off_the_quote_are_refused(market: Market, tmp_path: Path) -> None:
    made = market.call(market.acme, "POST", "/v1/jobs", {"task": TASK, "purpose": "research"}).json()
    job_id = made["job_id"]
    accept = {"quote_sha256": "0" * 64, "amount_minor": 1}
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/accept", accept), 409, "job_state")
    _refused(market.call(market.acme, "GET", f"/v1/jobs/{job_id}/model"), 409, "job_state")
    _refused(market.call(market.acme, "GET", f"/v1/jobs/{job_id}/manifest"), 409, "job_state")
    wrong_shape = validation_bytes(tmp_path, length=17)
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/validation", wrong_shape), 400, "malformed")
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/validation", b"not a window file"), 400, "malformed")
    quoted = market.call(market.acme, "POST", f"/v1/jobs/{job_id}/quote").json()
    total = quoted["quote"]["total_minor"]
    # No validation data yet.
    no_data = {"quote_sha256": quoted["quote_sha256"], "amount_minor": total}
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/accept", no_data), 409, "job_state")
    assert market.call(market.acme, "POST", f"/v1/jobs/{job_id}/validation", validation_bytes(tmp_path)).is_success
    underpaid = {"quote_sha256": quoted["quote_sha256"], "amount_minor": total - 1}
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/accept", underpaid), 422, "policy_violation")
    other_quote = {"quote_sha256": "f" * 64, "amount_minor": total}
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/accept", other_quote), 409, "job_state")
    assert _leaves(market, LeafKind.ESCROW) == []
    # Cancelled before acceptance: no money moved, and nothing more can be done with it.
    assert market.call(market.acme, "POST", f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/quote"), 409, "job_state")
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/cancel"), 409, "job_state")


def test_a_job_that_fails_after_acceptance_refunds_its_escrow(market: Market, tmp_path: Path) -> None:
    """The coordinator's SuperLink is not running, so the accepted job fails at its start, as when it is gone."""
    job = market.quoted_job(market.acme, tmp_path)
    job_id, total = job["job_id"], job["quote"]["total_minor"]
    body = json.dumps({"quote_sha256": job["quote_sha256"], "amount_minor": total}).encode()
    accepted = market.call(market.acme, "POST", f"/v1/jobs/{job_id}/accept", body)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["escrow"]["amount_minor"] == total
    ended = market.wait_state(market.acme, job_id, ("failed", "delivered"))
    assert ended["state"] == "failed" and "SuperLink" in ended["reason"], ended
    [(escrow_index, escrow_body)] = _leaves(market, LeafKind.ESCROW)
    [(refund_index, refund_body)] = _leaves(market, LeafKind.REFUND)
    assert _leaves(market, LeafKind.ESCROW_RELEASE) == [] and _leaves(market, LeafKind.SETTLEMENT) == []
    assert (ended["ledger"]["escrow"], ended["ledger"]["refund"]) == (escrow_index, refund_index)
    deposit, refund = decode_escrow_record(escrow_body), decode_escrow_record(refund_body)
    assert (deposit.event, deposit.amount_minor, deposit.job_id, deposit.buyer) == ("deposit", total, job_id, "acme")
    assert (refund.event, refund.amount_minor, refund.quote_sha256) == ("refund", total, deposit.quote_sha256)
    assert refund.reason == ended["reason"]
    # The escrow leaf holds the buyer's own signature over exactly the accept request it records.
    key = market.acme.key.verifier
    trusted = {key.key_id.hex(): key}
    verified = open_envelope(deposit.authorisation.encode(), trusted, BuyerRequestStatement.PAYLOAD_TYPE)
    signed = decode(verified, BuyerRequestStatement)
    assert signed.target == f"/v1/jobs/{job_id}/accept"
    assert signed.body_sha256 == hashlib.sha256(deposit.authorised_body.encode()).hexdigest()
    assert deposit.authorised_body.encode() == body
    # Accepting again changes nothing; a failed job cannot be cancelled.
    again = market.call(market.acme, "POST", f"/v1/jobs/{job_id}/accept", body)
    assert again.status_code == 200 and again.json()["state"] == "failed"
    _refused(market.call(market.acme, "POST", f"/v1/jobs/{job_id}/cancel"), 409, "job_state")
    assert len(_leaves(market, LeafKind.ESCROW)) == 1 and len(_leaves(market, LeafKind.REFUND)) == 1


def test_an_accepted_job_the_coordinator_lost_on_restart_is_refunded(market: Market, tmp_path: Path) -> None:
    job = market.quoted_job(market.acme, tmp_path)
    stored = market.desk._stored(job["job_id"])
    stored.escrow = Escrow(
        amount_minor=job["quote"]["total_minor"], currency="EUR", quote_sha256=job["quote_sha256"], index=0
    )
    market.desk._save(stored, "running")  # as a crash mid-run leaves it
    market.desk.recover()
    ended = market.call(market.acme, "GET", f"/v1/jobs/{job['job_id']}").json()
    assert ended["state"] == "failed" and "restarted" in ended["reason"]
    [(_, refund)] = _leaves(market, LeafKind.REFUND)
    assert decode_escrow_record(refund).amount_minor == job["quote"]["total_minor"]


def test_events_stream_the_job_until_it_ends(market: Market, tmp_path: Path) -> None:
    job = market.quoted_job(market.acme, tmp_path)
    job_id = job["job_id"]
    market.call(market.acme, "POST", f"/v1/jobs/{job_id}/cancel")
    streamed = market.call(market.acme, "GET", f"/v1/jobs/{job_id}/events")
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[len("data: ") :]) for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert [e["state"] for e in events] == ["cancelled"] and events[0]["job_id"] == job_id


def test_a_task_a_buyer_proposes_with_its_job_is_quoted_once_the_operator_approves_it(
    market: Market, tmp_path: Path
) -> None:
    from protocol.tasks.spec import get_task

    spec = get_task("plaid-appliance", 1).model_dump(mode="json")
    spec.update(id="acme-appliance", description="acme's appliance classes")
    request = {"task": "acme-appliance@1", "purpose": "research", "task_spec": spec}
    wrong = market.call(market.acme, "POST", "/v1/jobs", {**request, "task": "acme-appliance@2"})
    _refused(wrong, 400, "malformed")  # the spec is not the task the request names
    made = market.call(market.acme, "POST", "/v1/jobs", request)
    assert made.status_code == 201, made.text
    job = made.json()
    assert job["task_proposed"] is True and job["request"]["rounds"] == spec["recipe"]["rounds"]
    uploaded = market.call(market.acme, "POST", f"/v1/jobs/{job['job_id']}/validation", validation_bytes(tmp_path))
    assert uploaded.status_code == 200, uploaded.text  # checked against the proposed task's windows
    refused = market.call(market.acme, "POST", f"/v1/jobs/{job['job_id']}/quote")
    _refused(refused, 409, "job_state")
    assert "awaits the operator's approval" in refused.json()["message"]
    listed = _cli(market, "proposals", group="task")
    assert listed.returncode == 0 and f"{job['job_id']}  acme  acme-appliance@1" in listed.stdout, listed
    approved = _cli(market, "approve", job["job_id"], group="task")
    assert approved.returncode == 0 and "approved: acme-appliance@1" in approved.stdout, approved
    assert _cli(market, "proposals", group="task").stdout == ""
    quoted = market.call(market.acme, "POST", f"/v1/jobs/{job['job_id']}/quote")
    assert quoted.status_code == 200 and quoted.json()["quote"]["members"] == ["ann", "bob", "cy"], quoted.text
    # Proposing another spec under a task the MID has is refused; a job without a proposal has none to approve.
    other = {**request, "task_spec": {**spec, "description": "something else"}}
    _refused(market.call(market.acme, "POST", "/v1/jobs", other), 422, "policy_violation")
    plain = market.call(market.acme, "POST", "/v1/jobs", {"task": TASK, "purpose": "research"}).json()
    assert _cli(market, "approve", plain["job_id"], group="task").returncode == 2


@pytest.mark.parametrize("dp_required", [True, False])
def test_a_job_that_requires_dp_is_launched_with_the_mids_dp_and_one_that_does_not_without(
    market: Market, tmp_path: Path, dp_required: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    launched = []
    launcher = market.desk.launcher
    run = launcher.run

    def recording(request: Any, spec: Any, report: Any) -> Any:
        launched.append(request)
        return run(request, spec, report)

    monkeypatch.setattr(launcher, "run", recording)
    job = market.quoted_job(market.acme, tmp_path, dp_required=dp_required)
    body = {"quote_sha256": job["quote_sha256"], "amount_minor": job["quote"]["total_minor"]}
    assert market.call(market.acme, "POST", f"/v1/jobs/{job['job_id']}/accept", body).status_code == 200
    market.wait_state(market.acme, job["job_id"], ("failed", "delivered"))  # no SuperLink: it fails at its start
    [request] = launched
    terms = market.desk.terms
    if dp_required:
        assert terms.dp_clipping_norm > 0 and terms.dp_noise_multiplier > 0
        assert (request.dp_clipping_norm, request.dp_noise_multiplier) == (
            terms.dp_clipping_norm,
            terms.dp_noise_multiplier,
        )
    else:
        assert (request.dp_clipping_norm, request.dp_noise_multiplier) == (0.0, 0.0)
