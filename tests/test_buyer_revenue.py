"""`midgate buyer report-revenue` against the coordinator's real HTTP app: a buyer-signed RevenueReport becomes a
ROYALTY leaf whose split recomputes from the ledger; forged, unknown, replayed and off-policy reports are refused with
their reason codes and change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from mqtt_fixtures import MosquittoProcess, free_port, wait_for_port
from prometheus_client import CollectorRegistry

from coordinator.buyer.http import RevenueDesk
from coordinator.config import CoordinatorSettings
from coordinator.enrolment.enroller import Enroller
from coordinator.ledger.store import LedgerReader, LedgerStore
from coordinator.market.store import MarketStore
from coordinator.mid_key import mid_key_name
from coordinator.registry.store import Registry
from coordinator.royalties import KnobPolicy, MemberAttribution, ModelAttribution, RoyaltyPolicy, settle_job
from coordinator.royalties.ledger_records import append_split, find_split
from coordinator.serve.assembly import CoordinatorProcess
from coordinator.serve.http import build_http_app
from protocol.checkpoint import verify_receipt
from protocol.enrolment import BrokerCredentials
from protocol.errors import Reason
from protocol.identity import SignerKey, VerifierKey, save_signer_key
from protocol.messages import RevenueReport

pytest_plugins = ["mqtt_fixtures"]

MID = "riverside"
CLI = [sys.executable, "-c", "from midgate_cli import app; app()"]
POLICY = RoyaltyPolicy(
    version=1, fee_bps=2000, knob=KnobPolicy(base_price_minor=1_000, min_price_minor=100, max_price_minor=10_000)
)
NOW = 1_800_000_000_000


@dataclass
class Coordinator:
    url: str
    ledger_path: Path
    ledger: LedgerStore
    log_key: VerifierKey
    buyer_key: Path
    refusals: list[Reason]
    market: MarketStore | None = None


def _no_broker(device: str, password: str) -> BrokerCredentials:
    raise AssertionError("no enrolment in this test")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    buyer_key = tmp_path / "buyer.key"
    keygen = _cli("buyer", "keygen", "--key", str(buyer_key), "--name", "acme")
    assert keygen.returncode == 0, keygen.stderr
    assert stat.S_IMODE(os.stat(buyer_key).st_mode) == 0o600
    stranger = SignerKey.generate("acme")  # same name, different key: must not pass as acme
    log_key = SignerKey.generate(mid_key_name(MID))
    ledger_path = tmp_path / "ledger.sqlite"
    ledger = LedgerStore.open(ledger_path, log_key)
    members = [
        MemberAttribution(member="ann", value_units=700, knob_milli=0, rounds=4, excluded_rounds=0),
        MemberAttribution(member="bob", value_units=300, knob_milli=500, rounds=4, excluded_rounds=0),
    ]
    attribution = ModelAttribution(job_id="job-1", model_version="plaid-v1", policy=POLICY, members=members)
    append_split(ledger, settle_job(attribution, 50_000, record_id="job-1.settlement", created_ms=NOW, currency="EUR"))
    registry = Registry(tmp_path / "registry.sqlite")
    enroller = Enroller(MID, registry, ledger, log_key, _no_broker, lambda device: None, 16 * 1024)
    keys = {"acme": keygen.stdout.strip(), "globex": stranger.verifier.text()}
    market = MarketStore(tmp_path / "market.sqlite")  # the buyers `coordinator buyer add` registers
    desk = RevenueDesk(MID, "EUR", keys, ledger, 16 * 1024, registered=market)
    refusals: list[Reason] = []
    app = build_http_app(
        enroller=enroller, ledger=ledger, revenue=desk, metrics=CollectorRegistry(), on_refusal=refusals.append
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port(port)
        yield Coordinator(
            f"http://127.0.0.1:{port}", ledger_path, ledger, log_key.verifier, buyer_key, refusals, market
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        market.close()
        registry.close()
        ledger.close()


def _report(c: Coordinator, *extra: str, amount: str = "40001", seq: str = "1", key: Path | None = None) -> list[str]:
    return [
        "buyer",
        "report-revenue",
        "plaid-v1",
        amount,
        "--key",
        str(key or c.buyer_key),
        "--coordinator",
        c.url,
        "--mid",
        MID,
        "--buyer",
        "acme",
        "--model-id",
        "plaid",
        "--currency",
        "EUR",
        "--period-start-ms",
        str(NOW),
        "--period-end-ms",
        str(NOW + 86_400_000),
        "--seq",
        seq,
        *extra,
    ]


def test_signed_report_appends_a_royalty_leaf_that_recomputes(coordinator: Coordinator) -> None:
    c = coordinator
    result = _cli(*_report(c))
    assert result.returncode == 0, result.stderr
    receipt = json.loads(result.stdout)
    assert receipt["index"] == 1 and receipt["record_id"].startswith("revenue-")
    with LedgerReader.open_existing(c.ledger_path) as reader:
        split = find_split(reader, receipt["record_id"])
        assert verify_receipt(receipt["receipt"], reader.leaf(split.index), c.log_key).index == split.index
    assert split.index == 1 and split.record.inputs.kind == "royalty"
    paid = {p.member: p.amount_minor for p in split.record.payouts}
    assert sum(paid.values()) + split.record.fee_minor == 40_001
    assert split.record.fee_minor <= 40_001 * 3000 // 10_000 and paid["ann"] > paid["bob"] > 0
    recompute = _cli("ledger", "recompute-settlement", receipt["record_id"], "--db", str(c.ledger_path))
    assert (recompute.returncode, recompute.stdout) == (0, "ok\n"), recompute.stderr


def test_replayed_seq_is_refused_and_logs_nothing(coordinator: Coordinator) -> None:
    c = coordinator
    assert _cli(*_report(c)).returncode == 0
    size = c.ledger.size
    again = _cli(*_report(c, amount="99"))
    assert again.returncode == 1 and "replayed" in again.stderr
    assert c.ledger.size == size and c.refusals == [Reason.REPLAYED]
    assert _cli(*_report(c, seq="2")).returncode == 0  # a new seq is a new report


def test_unknown_and_impostor_keys_are_refused(coordinator: Coordinator, tmp_path: Path) -> None:
    c = coordinator
    unknown = tmp_path / "unknown.key"
    save_signer_key(unknown, SignerKey.generate("acme"))
    result = _cli(*_report(c, key=unknown))
    assert result.returncode == 1 and "unknown_key" in result.stderr
    assert c.ledger.size == 1 and c.refusals == [Reason.UNKNOWN_KEY]


def _post(c: Coordinator, body: bytes) -> tuple[int, dict[str, str]]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(c.url + "/v1/buyer/revenue", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _signed(key: SignerKey, **changes: object) -> bytes:
    fields: dict[str, object] = {
        "mid": MID,
        "buyer": "globex",
        "model_id": "plaid",
        "model_version": "plaid-v1",
        "period_start_ms": NOW,
        "period_end_ms": NOW + 1,
        "amount_minor": 1_000,
        "currency": "EUR",
        "seq": 7,
        "issued_ms": NOW,
    }
    return RevenueReport.model_validate({**fields, **changes}).seal(key)


def test_forged_and_off_policy_reports_are_refused_over_http(coordinator: Coordinator) -> None:
    c = coordinator
    acme = SignerKey.parse(c.buyer_key.read_text())
    # acme's valid signature over one report, carried with another report's payload (a bigger amount)
    forged = json.loads(_signed(acme, buyer="acme"))
    forged["payload"] = json.loads(_signed(acme, buyer="acme", amount_minor=10**9))["payload"]
    forged_body = json.dumps(forged)
    cases = [
        (forged_body.encode(), 403, "bad_signature"),
        (_signed(acme), 403, "unknown_key"),  # acme's key signing as globex
        (_signed(acme, buyer="acme", currency="USD"), 422, "policy_violation"),
        (_signed(acme, buyer="acme", mid="elsewhere"), 422, "policy_violation"),
        (_signed(acme, buyer="acme", model_version="never-settled"), 404, "unknown_model"),
        (b"{" * 20_000, 413, "too_large"),
        (b"not json", 400, "malformed"),
    ]
    for body, status, reason in cases:
        answer_status, answer = _post(c, body)
        assert (answer_status, answer["reason"]) == (status, reason), answer
    assert c.ledger.size == 1
    assert [str(r) for r in c.refusals] == [reason for _, _, reason in cases]


def test_registered_buyers_report_and_revoked_ones_are_refused(coordinator: Coordinator) -> None:
    """A buyer the operator registered (`coordinator buyer add`, not in `[buyers.keys]`) reports revenue under its
    registered name, from the next report on; once revoked its reports are refused `revoked_key` and log nothing."""
    c = coordinator
    assert c.market is not None
    initech = SignerKey.generate("initech")
    before = _post(c, _signed(initech, buyer="initech"))
    assert (before[0], before[1]["reason"]) == (403, "unknown_key")
    c.market.add_buyer("initech", initech.verifier, NOW)
    accepted = _post(c, _signed(initech, buyer="initech"))
    assert accepted[0] == 200 and accepted[1]["index"] == 1, accepted
    impostor = _post(c, _signed(initech, buyer="acme", seq=8))  # a registered key reporting as another buyer
    assert (impostor[0], impostor[1]["reason"]) == (403, "unknown_key")
    replayed = _post(c, _signed(initech, buyer="initech"))
    assert (replayed[0], replayed[1]["reason"]) == (409, "replayed")
    c.market.revoke_buyer("initech", NOW + 1)
    revoked = _post(c, _signed(initech, buyer="initech", seq=9))
    assert (revoked[0], revoked[1]["reason"]) == (403, "revoked_key")
    assert c.ledger.size == 2
    assert [str(r) for r in c.refusals] == ["unknown_key", "unknown_key", "replayed", "revoked_key"]
    # `[buyers.keys]` keeps working beside the registered buyers.
    assert _cli(*_report(c)).returncode == 0 and c.ledger.size == 3


def test_keygen_refuses_to_overwrite(coordinator: Coordinator) -> None:
    before = coordinator.buyer_key.read_text()
    result = _cli("buyer", "keygen", "--key", str(coordinator.buyer_key))
    assert result.returncode == 1 and coordinator.buyer_key.read_text() == before


def test_serve_mounts_the_revenue_endpoint(tmp_path: Path, mosquitto: MosquittoProcess) -> None:
    """The real coordinator service, configured from settings with a `[buyers.keys]` entry, takes a buyer's report,
    and one from a buyer registered while it runs (in the market store `coordinator buyer add` writes)."""
    buyer_key = tmp_path / "buyer.key"
    keygen = _cli("buyer", "keygen", "--key", str(buyer_key), "--name", "acme")
    assert keygen.returncode == 0, keygen.stderr
    port = free_port()
    settings = CoordinatorSettings.load(
        None,
        mid=MID,
        data_dir=tmp_path / "coordinator",
        broker={"port": mosquitto.port},
        enrolment={"port": port},
        buyers={"keys": {"acme": keygen.stdout.strip()}},
    )
    members = [MemberAttribution(member="ann", value_units=1, knob_milli=0, rounds=1, excluded_rounds=0)]
    attribution = ModelAttribution(job_id="job-1", model_version="plaid-v1", policy=POLICY, members=members)
    settled = settle_job(attribution, 10_000, record_id="job-1.settlement", created_ms=NOW, currency="EUR")

    initech = SignerKey.generate("initech")

    async def scenario() -> tuple[subprocess.CompletedProcess[str], tuple[int, dict[str, str]], int]:
        async with CoordinatorProcess(settings) as process:
            service = process.storage
            await asyncio.to_thread(append_split, service.ledger, settled)
            url = f"http://127.0.0.1:{port}"
            coordinator = Coordinator(url, tmp_path, service.ledger, service.mid_key.verifier, buyer_key, [])
            result = await asyncio.to_thread(_cli, *_report(coordinator))
            market = MarketStore(settings.market_path)
            try:
                market.add_buyer("initech", initech.verifier, NOW)
            finally:
                market.close()
            registered = await asyncio.to_thread(_post, coordinator, _signed(initech, buyer="initech"))
            return result, registered, service.ledger.size

    result, registered, size = asyncio.run(scenario())
    assert result.returncode == 0, result.stderr
    # Leaf 0 is the POLICY leaf serve logs when it starts, 1 the settlement, 2 and 3 the royalties.
    assert json.loads(result.stdout)["index"] == 2 and registered[0] == 200 and registered[1]["index"] == 3, registered
    assert size == 4
