"""A buyer client written from docs/protocol.md ("Buyer request signatures", "Buyer jobs") alone calls the buyer job
API: its own Ed25519 key and C2SP key text, canonical JSON, a hand-made DSSE PAE and envelope, base64 in the
`Midgate-Signature` header. Above "The harness" nothing of midgate is used, only the standard library and raw Ed25519
from `cryptography`."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# --- the client: docs/protocol.md and nothing else -------------------------------------------------------------------

BUYER_REQUEST = "application/vnd.midgate.buyer-request.v1+json"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class DocClient:
    def __init__(self, name: str, buyer: str) -> None:
        self.name, self.buyer = name, buyer
        self.private = Ed25519PrivateKey.generate()
        public = self.private.public_key().public_bytes_raw()
        self.key_id = hashlib.sha256(name.encode() + b"\n" + b"\x01" + public).digest()[:4]
        material = _b64(bytes([1]) + public)
        self.key_text = f"{name}+{self.key_id.hex()}+{material}"

    def headers(self, method: str, target: str, body: bytes) -> dict[str, str]:
        statement = {
            "buyer": self.buyer,
            "method": method,
            "target": target,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "issued_ms": time.time_ns() // 1_000_000,
            "nonce": secrets.token_hex(16),
        }
        payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        pae = b"DSSEv1 %d %b %d %b" % (len(BUYER_REQUEST), BUYER_REQUEST.encode(), len(payload), payload)
        envelope = {
            "payloadType": BUYER_REQUEST,
            "payload": _b64(payload),
            "signatures": [{"keyid": self.key_id.hex(), "sig": _b64(self.private.sign(pae))}],
        }
        return {"Midgate-Signature": _b64(json.dumps(envelope, separators=(",", ":")).encode())}


# --- the harness ----------------------------------------------------------------------------------------------------

pytest_plugins = ["market_fixtures"]


def test_a_client_written_from_the_docs_requests_and_quotes_a_job(market: Any, tmp_path: Path) -> None:
    from market_fixtures import TASK, validation_bytes

    from protocol.identity import VerifierKey

    client = DocClient("initech-2026", "initech")
    market.store.add_buyer("initech", VerifierKey.parse(client.key_text), time.time_ns() // 1_000_000)
    body = json.dumps({"task": TASK, "purpose": "research", "min_members": 2}).encode()
    made = market.client.post("/v1/jobs", content=body, headers=client.headers("POST", "/v1/jobs", body))
    assert made.status_code == 201, made.text
    job_id = made.json()["job_id"]
    data = validation_bytes(tmp_path)
    target = f"/v1/jobs/{job_id}/validation"
    assert market.client.post(target, content=data, headers=client.headers("POST", target, data)).is_success
    target = f"/v1/jobs/{job_id}/quote"
    quoted = market.client.post(target, headers=client.headers("POST", target, b""))
    assert quoted.status_code == 200 and quoted.json()["quote"]["total_minor"] > 0, quoted.text
    target = "/v1/jobs?state=quoted"  # a query is part of what is signed
    listed = market.client.get(target, headers=client.headers("GET", target, b""))
    assert [j["job_id"] for j in listed.json()["jobs"]] == [job_id]


def test_the_client_section_imports_nothing_of_midgate() -> None:
    import ast

    tree = ast.parse(Path(__file__).read_text().split("# --- the harness")[0])
    imported = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not any(m.split(".")[0] in ("protocol", "coordinator", "edge", "demo") for m in imported), imported
