"""The buyer job API on real storage for in-process tests: the MID's ledger, task catalogue, registry (three enrolled
devices of three members, heard from just now) and market store, in SQLite files under tmp_path; the job desk with the
real Flower launcher of a coordinator whose SuperLink is not running (so an accepted job fails at its start, as it
does when serve's SuperLink is gone); the HTTP app `serve` builds; and signed calls through Starlette's TestClient."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from coordinator.buyer.http import RevenueDesk
from coordinator.config import CoordinatorSettings
from coordinator.ledger.store import LedgerStore
from coordinator.market.desk import JobDesk, MarketTerms
from coordinator.market.runner import FlowerJobLauncher
from coordinator.market.store import MarketStore
from coordinator.mid_key import mid_key_name
from coordinator.policy.document import configured_policy
from coordinator.policy.ledger_records import PolicyLog
from coordinator.registry.presence import Presence
from coordinator.registry.store import Registry
from coordinator.serve.http import build_http_app
from coordinator.tasks.catalogue import TaskCatalogue
from protocol.buyer_request import sign_request
from protocol.errors import Reason
from protocol.identity import SignerKey, save_signer_key
from protocol.messages import DeviceStatus
from protocol.private_files import private_dir, private_file
from protocol.tasks.spec import get_task
from protocol.tasks.windows import WindowSet, save_window_file, window_fingerprint

MID = "riverside"
TASK = "plaid-appliance@1"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def validation_bytes(tmp_path: Path, windows: int = 40, length: int | None = None) -> bytes:
    """A window file for plaid-appliance@1 (or of another window length, which does not fit it)."""
    spec = get_task("plaid-appliance", 1)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(windows, spec.channels, length or spec.window_length)).astype(np.float32)
    y = rng.integers(0, 3, size=windows)
    path = tmp_path / f"validation-{windows}-{length}.npz"
    save_window_file(path, WindowSet(x=x, y=y, fingerprint=window_fingerprint(x, y)))
    return path.read_bytes()


@dataclass
class Buyer:
    name: str
    key: SignerKey

    def headers(self, method: str, target: str, body: bytes = b"", at_ms: int | None = None) -> dict[str, str]:
        return sign_request(self.key, self.name, method, target, body, now_ms() if at_ms is None else at_ms)


@dataclass
class Market:
    settings: CoordinatorSettings
    client: TestClient
    desk: JobDesk
    store: MarketStore
    ledger: LedgerStore
    registry: Registry
    acme: Buyer
    globex: Buyer
    refusals: list[Reason]

    def call(
        self, buyer: Buyer, method: str, target: str, body: bytes | Any = b"", headers: dict[str, str] | None = None
    ) -> Any:
        """A signed request; `body` is bytes or a JSON document."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        signed = buyer.headers(method, target, data)
        return self.client.request(method, target, content=data, headers={**signed, **(headers or {})})

    def quoted_job(self, buyer: Buyer, tmp_path: Path, **request: Any) -> dict[str, Any]:
        """A job requested, with validation data, and quoted."""
        made = self.call(buyer, "POST", "/v1/jobs", {"task": TASK, "purpose": "research", **request})
        assert made.status_code == 201, made.text
        job_id = made.json()["job_id"]
        uploaded = self.call(buyer, "POST", f"/v1/jobs/{job_id}/validation", validation_bytes(tmp_path))
        assert uploaded.status_code == 200, uploaded.text
        quoted = self.call(buyer, "POST", f"/v1/jobs/{job_id}/quote")
        assert quoted.status_code == 200, quoted.text
        return dict(quoted.json())

    def wait_state(self, buyer: Buyer, job_id: str, states: tuple[str, ...], timeout_s: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.call(buyer, "GET", f"/v1/jobs/{job_id}").json()
            if job["state"] in states or time.monotonic() > deadline:
                return dict(job)
            time.sleep(0.05)


@pytest.fixture
def market(tmp_path: Path) -> Iterator[Market]:
    data = tmp_path / "data"
    settings = CoordinatorSettings(mid=MID, data_dir=data, federation={"enabled": True})  # type: ignore[arg-type]
    private_dir(data)
    mid_key = SignerKey.generate(mid_key_name(MID))
    save_signer_key(settings.mid_key_file, mid_key)  # the operator's commands (`task approve`) sign with it too
    ledger = LedgerStore.open(private_file(settings.ledger_path), mid_key)
    catalogue = TaskCatalogue(settings.tasks_path, mid_key, now_ms())
    registry = Registry(settings.registry_path)
    now = now_ms()
    for i, member in enumerate(("ann", "bob", "cy")):
        device = f"d-{member}"
        registry.add_invite(f"inv-{device}", member, now, now + 60_000)
        registry.redeem_invite(f"inv-{device}", now, device, SignerKey.generate(device).verifier, "$7$101$x$y")
        registry.add_flower_node(device, 100 + i, f"ecdsa-sha2-nistp256 {device}", now)
    registry.record_presence([Presence(f"d-{m}", DeviceStatus.IDLE, now, now, False) for m in ("ann", "bob", "cy")])
    store = MarketStore(settings.market_path)
    terms = MarketTerms(
        currency="EUR",
        policy=settings.royalties.policy(),
        validation_dir=data / "market" / "validation",
        offline_after_s=3600,
        settle_timeout_s=5,
    )
    policies = PolicyLog(ledger, lambda: configured_policy(settings))
    policies.sync()  # the MID policy's first POLICY leaf, as serve appends it at start
    launcher = FlowerJobLauncher(settings, mid_key)
    desk = JobDesk(store, catalogue, registry, ledger, terms, launcher, policies=policies)
    acme, globex = Buyer("acme", SignerKey.generate("acme")), Buyer("globex", SignerKey.generate("globex"))
    store.add_buyer(acme.name, acme.key.verifier, now)
    store.add_buyer(globex.name, globex.key.verifier, now)
    refusals: list[Reason] = []
    placeholder: Any = object()
    app = build_http_app(
        enroller=placeholder,
        ledger=ledger,
        revenue=RevenueDesk(MID, "EUR", {}, ledger, 16 * 1024),
        metrics=CollectorRegistry(),
        on_refusal=refusals.append,
        tasks=catalogue,
        market=desk,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Market(settings, client, desk, store, ledger, registry, acme, globex, refusals)
    desk.close()
    store.close()
    registry.close()
    catalogue.close()
    ledger.close()
