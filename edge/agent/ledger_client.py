"""The agent's client of its MID's ledger API (docs/protocol.md, "Member ledger API"): checkpoints, consistency
proofs, the witness list, cosignatures, the member's proven statement; and the MID's signed task specs.

Nothing it fetches is trusted: the callers check every note's signature and every proof. Blocking (urllib): the
daemon calls it from its outbox thread, the member commands from their own process. A network failure is
`ProofUnavailableError` (try again later); an answer the MID refused is `RefusedByMidError` with its reason code.
"""

from __future__ import annotations

import base64
import binascii
import json
import urllib.error
import urllib.request

from protocol.errors import MalformedError, TooLargeError
from protocol.ledger_api import MAX_STATEMENT_BYTES, KnobPrice, PurposeList, StatementProof, WitnessList
from protocol.merkle import HASH_SIZE
from protocol.note import MAX_NOTE_SIZE
from protocol.tasks.signed import MAX_SIGNED_TASK_SPEC_BYTES

MAX_PROOF_RESPONSE = 64 * 1024
MAX_REFUSAL = 8 * 1024
NOTE_TYPE = "text/plain; charset=utf-8"


class ProofUnavailableError(Exception):
    """The MID's API gave nothing to check: unreachable, or it refused; try again later (nothing was settled or
    cosigned meanwhile)."""


class RefusedByMidError(ProofUnavailableError):
    """The MID answered with a refusal: `{"reason", "message"}` and an HTTP status."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class LedgerClient:
    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def consistency(self, old: int, new: int) -> list[bytes]:
        """The RFC 9162 consistency proof from tree size `old` to `new` (hashes of the right size, not verified)."""
        body = self._call("GET", f"/v1/consistency?old={old}&new={new}", limit=MAX_PROOF_RESPONSE)
        try:
            proof = [base64.b64decode(line, validate=True) for line in body.decode("ascii").splitlines()]
        except (UnicodeDecodeError, binascii.Error, ValueError) as exc:
            raise MalformedError("consistency proof is not base64 lines") from exc
        if any(len(h) != HASH_SIZE for h in proof):
            raise MalformedError("consistency proof hash of the wrong size")
        return proof

    def witnesses(self) -> WitnessList:
        return WitnessList.parse(self._call("GET", "/v1/witnesses", limit=MAX_STATEMENT_BYTES))

    def witnessed_checkpoint(self) -> bytes:
        """The latest checkpoint the MID holds a quorum of cosignatures for (a signed note, not verified)."""
        return self._call("GET", "/v1/checkpoint/witnessed", limit=MAX_NOTE_SIZE)

    def candidate_checkpoint(self) -> bytes:
        """The checkpoint the MID asks its witnesses to cosign now (a signed note, not verified)."""
        return self._call("GET", "/v1/checkpoint/candidate", limit=MAX_NOTE_SIZE)

    def cosign(self, cosigned_note: bytes) -> None:
        """Hand the MID a cosignature: the checkpoint text with this witness's cosignature line."""
        self._call("POST", "/v1/cosignature", body=cosigned_note, content_type=NOTE_TYPE, limit=MAX_REFUSAL)

    def task_spec(self, task_id: str, version: int) -> bytes:
        """The MID's signed spec of task_id@version (a DSSE envelope, not verified; protocol.tasks.signed)."""
        return self._call("GET", f"/v1/tasks/{task_id}@{version}", limit=MAX_SIGNED_TASK_SPEC_BYTES)

    def knob_price(self, knob_milli: int) -> KnobPrice:
        """What `knob_milli` means under the MID's current policy: the price it yields and the knob's range."""
        return KnobPrice.parse(self._call("GET", f"/v1/member/knob-price?knob_milli={knob_milli}", limit=4096))

    def purposes(self) -> PurposeList:
        """The purposes the MID's policy in force lets a job name: what consent chooses from."""
        return PurposeList.parse(self._call("GET", "/v1/member/purposes", limit=256 * 1024))

    def statement(self, request_envelope: bytes) -> StatementProof:
        """The member's settlement and royalty leaves with their proofs, for a signed StatementRequest."""
        answer = self._call(
            "POST",
            "/v1/member/statement",
            body=request_envelope,
            content_type="application/vnd.dsse.envelope.v1+json",
            limit=MAX_STATEMENT_BYTES,
        )
        return StatementProof.parse(answer)

    def _call(
        self, method: str, path: str, *, limit: int, body: bytes | None = None, content_type: str | None = None
    ) -> bytes:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                data = bytes(response.read(limit + 1))
        except urllib.error.HTTPError as exc:
            raise _refusal(exc) from None
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise ProofUnavailableError(f"{self.base_url}{path.split('?')[0]}: {exc}") from exc
        if len(data) > limit:
            raise TooLargeError("MID answer too large", path=path.split("?")[0], limit=limit)
        return data


def _refusal(error: urllib.error.HTTPError) -> RefusedByMidError:
    raw = error.read(MAX_REFUSAL + 1)
    try:
        answer = json.loads(raw)
        return RefusedByMidError(error.code, str(answer["reason"])[:64], str(answer["message"])[:1024])
    except (ValueError, KeyError, TypeError):
        return RefusedByMidError(error.code, "http_error", f"HTTP {error.code}")
