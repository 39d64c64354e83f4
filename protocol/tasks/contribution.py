"""The contribution record a device's ClientApp writes after each round, for the agent to sign and send.

The agent wraps these exact bytes in a signed envelope; the coordinator verifies the signature first, then parses
with `parse_contribution_record`, then cross-checks `update_sha256` against the update Flower delivered for that
node (coordinator.gate.update_check).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import MalformedError, TooLargeError
from protocol.tasks.spec import TaskId

RECORD_TYPE = "application/vnd.midgate.contribution.v1+json"
MAX_RECORD_BYTES = 8192
U64_MAX = (1 << 64) - 1

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class DPParams(BaseModel):
    """Client-side fixed clipping as applied by Flower's fixedclipping_mod; noise is added at the server."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    clipping_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)


class ContributionRecord(BaseModel):
    """What one node did in one round of one Flower run.

    `node_id` is the SuperLink's id of the node (stable per registered key); `global_model_sha256` and
    `update_sha256` are `protocol.tasks.arrays.arrays_sha256` of the arrays received and returned; `examples` is
    self-reported and never used as an aggregation weight without a server-side cap. In drift-corrected jobs
    (protocol.tasks.drift) `gradient_sha256` is the hash of the gradient the node returned to the round's query and
    `drift_offset_sha256` that of the offset it trained with; both None otherwise.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: str = Field(default=RECORD_TYPE, pattern=r"^application/vnd\.midgate\.contribution\.v1\+json$")
    run_id: int = Field(ge=0, le=U64_MAX)
    round: int = Field(ge=1, le=1_000_000)
    node_id: int = Field(ge=0, le=U64_MAX)
    task_id: TaskId
    task_version: int = Field(ge=1)
    global_model_sha256: Sha256Hex
    update_sha256: Sha256Hex
    examples: int = Field(ge=0, le=1 << 40)
    dataset_fingerprint: str = Field(min_length=1, max_length=128, pattern=r"^[0-9A-Za-z:_\-.]+$")
    loss_before: float
    loss_after: float
    seconds: float = Field(ge=0)
    dp: DPParams | None = None
    gradient_sha256: Sha256Hex | None = None
    drift_offset_sha256: Sha256Hex | None = None
    created_ms: int = Field(ge=0, le=U64_MAX)

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def parse_contribution_record(data: bytes) -> ContributionRecord:
    """Parse record bytes; size is checked before parsing, any schema violation is a MalformedError."""
    if len(data) > MAX_RECORD_BYTES:
        raise TooLargeError("contribution record too large", limit=MAX_RECORD_BYTES, found=len(data))
    try:
        return ContributionRecord.model_validate_json(data)
    except ValidationError as err:
        raise MalformedError("contribution record does not match the schema", errors=err.error_count()) from err
