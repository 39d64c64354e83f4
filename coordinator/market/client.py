"""A buyer's client of the job API: every request signed (protocol/buyer_request.py), refusals raised with their
reason. What `midgate buyer job ...` uses; written from docs/protocol.md, "Buyer request signatures"."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from protocol.buyer_request import sign_request
from protocol.identity import SignerKey

JOBS_PATH = "/v1/jobs"
MAX_ANSWER_BYTES = 512 * 1024 * 1024


class Refused(Exception):
    """The coordinator refused a request: HTTP status, reason code (empty for the framework's own answers)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{reason or f'HTTP {status}'}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class BuyerClient:
    base_url: str
    buyer: str
    key: SignerKey
    timeout_s: float = 30.0

    def call(
        self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        signed = sign_request(self.key, self.buyer, method, target, body, time.time_ns() // 1_000_000)
        request = urllib.request.Request(
            self.base_url.rstrip("/") + target,
            data=body if method != "GET" else None,
            headers={**signed, **(headers or {}), "Content-Type": "application/json"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return int(response.status), bytes(response.read(MAX_ANSWER_BYTES))
        except urllib.error.HTTPError as error:
            raise _refused(error) from None

    def json(self, method: str, target: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        return json.loads(self.call(method, target, data, headers)[1])

    def request_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        answer: dict[str, Any] = self.json("POST", JOBS_PATH, spec, headers)
        return answer

    def upload_validation(self, job_id: str, data: bytes) -> dict[str, Any]:
        answer: dict[str, Any] = json.loads(self.call("POST", f"{JOBS_PATH}/{job_id}/validation", data)[1])
        return answer

    def job(self, job_id: str, action: str = "") -> dict[str, Any]:
        method, target = ("POST", f"{JOBS_PATH}/{job_id}/{action}") if action else ("GET", f"{JOBS_PATH}/{job_id}")
        answer: dict[str, Any] = self.json(method, target)
        return answer

    def accept(self, job_id: str, quote_sha256: str, amount_minor: int) -> dict[str, Any]:
        body = {"quote_sha256": quote_sha256, "amount_minor": amount_minor}
        answer: dict[str, Any] = self.json("POST", f"{JOBS_PATH}/{job_id}/accept", body)
        return answer

    def jobs(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = self.json("GET", JOBS_PATH)["jobs"]
        return answer

    def model(self, job_id: str) -> bytes:
        return self.call("GET", f"{JOBS_PATH}/{job_id}/model")[1]

    def manifest(self, job_id: str) -> bytes:
        return self.call("GET", f"{JOBS_PATH}/{job_id}/manifest")[1]

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's server-sent events, each the job's JSON, until the job ends."""
        target = f"{JOBS_PATH}/{job_id}/events"
        signed = sign_request(self.key, self.buyer, "GET", target, b"", time.time_ns() // 1_000_000)
        request = urllib.request.Request(self.base_url.rstrip("/") + target, headers=signed, method="GET")
        try:
            response = urllib.request.urlopen(request, timeout=max(self.timeout_s, 60.0))
        except urllib.error.HTTPError as error:
            raise _refused(error) from None
        with response:
            for line in response:
                if line.startswith(b"data: "):
                    yield json.loads(line[len(b"data: ") :])


def _refused(error: urllib.error.HTTPError) -> Refused:
    detail = error.read()[:4096].decode(errors="replace")
    try:
        said = json.loads(detail)
        return Refused(error.code, str(said["reason"]), str(said["message"]))
    except (ValueError, KeyError, TypeError):
        return Refused(error.code, "", detail)
