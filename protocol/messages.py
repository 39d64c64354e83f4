"""The signed messages of the wire protocol, as strict pydantic v2 models.

Every model is frozen, forbids unknown fields, validates strictly (no str->int coercion), carries a version field
`v` and a class-level PAYLOAD_TYPE, the DSSE payloadType it travels under. A new field that old readers must not
ignore means a new version: a new PAYLOAD_TYPE (`...v2+json`) and a new class, so a v1 reader rejects a v2 payload with
`wrong_type` instead of misreading it.

Wire conventions (docs/protocol.md):
- u64 values (`seq`, Flower run and node ids) are decimal strings on the wire, since JSON numbers above 2^53 lose
  precision in common parsers; in Python they are ints.
- Timestamps are integer milliseconds since the epoch, UTC, between 2020-01-01 and 2100-01-01.
- Money is an integer number of minor units; the knob bias is an integer in milli-units. Floats appear only for
  measurements (losses, seconds, DP parameters) and never NaN or infinite.
- `canonical_json()` is the byte encoding that is signed: sorted keys, no whitespace, UTF-8.
"""

from __future__ import annotations

import json
import re
from binascii import b2a_base64
from collections.abc import Sequence
from enum import StrEnum
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_serializer,
    model_validator,
)

from protocol.envelope import VerifiedPayload, open_envelope, parse_unverified_payload, peek_envelope, seal
from protocol.errors import (
    BadKeyError,
    BadSignatureError,
    MalformedError,
    ReplayedError,
    TooLargeError,
    UnknownKeyError,
)
from protocol.identity import SignerKey, VerifierKey

U64_MAX = (1 << 64) - 1
# 2020-01-01 and 2100-01-01 UTC: a timestamp outside is a unit error (seconds or microseconds), not a date.
MIN_TIME_MS = 1_577_836_800_000
MAX_TIME_MS = 4_102_444_800_000
_U64_TEXT = re.compile(r"0|[1-9][0-9]{0,19}")


def _parse_u64(value: Any, info: ValidationInfo) -> int:
    if isinstance(value, str) and _U64_TEXT.fullmatch(value):
        number = int(value)
    elif info.mode == "python" and isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise ValueError("u64 must be a decimal string without sign or leading zeros")
    if not 0 <= number <= U64_MAX:
        raise ValueError("u64 out of range")
    return number


U64 = Annotated[
    int,
    PlainValidator(_parse_u64),
    PlainSerializer(str, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": "^(0|[1-9][0-9]{0,19})$"}),
]
TimeMs = Annotated[int, Field(ge=MIN_TIME_MS, le=MAX_TIME_MS)]
MinorUnits = Annotated[int, Field(ge=-(1 << 53), le=1 << 53)]
"""Money in integer minor units (cents); bounded so every JSON parser holds it exactly."""
Ident = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
"""MID, device, member, buyer, job, task and purpose ids: the topic-safe alphabet (protocol.topics)."""
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Nonce = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
"""128 random bits, lowercase hex; chosen by the coordinator per round."""
Measurement = Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1e12)]
VerifierKeyText = Annotated[str, StringConstraints(min_length=1, max_length=512)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
ShortText = Annotated[str, StringConstraints(max_length=256)]
FlowerPublicKey = Annotated[str, StringConstraints(pattern=r"^(ecdsa-sha2-nistp256 [A-Za-z0-9+/]{100,200}={0,2})?$")]


class CanonicalModel(BaseModel):
    """Strict, frozen, no unknown fields, and one byte encoding (`canonical_json`).

    Each message's validator is built at its first use (`defer_build`), not at import: a process uses few of the
    protocol's messages, and building them all left the idle agent 0.7 MB larger (BENCHMARKS.md, "Raspberry Pi hub").
    What a message accepts is the same either way."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)

    def canonical_json(self) -> bytes:
        """Sorted keys, no whitespace, UTF-8: the exact bytes that get signed."""
        return canonical_text(self.model_dump(mode="json")).encode()


class WireMessage(CanonicalModel):
    """Base of every signed message."""

    PAYLOAD_TYPE: ClassVar[str]

    def seal(self, key: SignerKey) -> bytes:
        """This message in a DSSE envelope signed by `key`."""
        return seal(self.PAYLOAD_TYPE, self.canonical_json(), key)


def _no_default(value: object) -> NoReturn:
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def canonical_text(doc: object) -> str:
    """`json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)`: a dump's
    canonical text, as `CanonicalModel.canonical_json` encodes it (protocol.job_log sizes a record's items by it)."""
    if _CANONICAL_ENCODER is None:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "".join(_CANONICAL_ENCODER(doc, 0))


# The C encoder json.dumps builds on every call with these options, built once: ingest re-encodes every report to
# check its canonical form (protocol.envelope.decode), and the per-call JSONEncoder cost a fifth of that check.
# No circular-reference markers: a model dump is a tree.
_CANONICAL_ENCODER: Any = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, _no_default, encode_basestring, None, ":", ",", True, False, False)
)


M = TypeVar("M", bound=BaseModel)


def _parse_bounded(model: type[M], data: bytes, limit: int, what: str) -> M:
    """Strict JSON parse of unsigned bytes (no envelope to check first), refused before parsing beyond `limit`."""
    if len(data) > limit:
        raise TooLargeError(f"{what} too large", limit=limit, found=len(data))
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        raise MalformedError(f"{what} does not match its schema", detail=str(exc)[:300]) from None


def _media_type(name: str, version: int = 1) -> str:
    return f"application/vnd.midgate.{name}.v{version}+json"


# --- device -> coordinator (signed by the device key; `seq` strictly increasing per key) -------------------------


class EnrolmentRequest(WireMessage):
    """A device asks to join a MID with a one-time invite; signed by the device key it enrols."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("enrolment-request")
    v: Literal[1] = 1
    mid: Ident
    device: Ident
    device_key: VerifierKeyText
    """C2SP verifier key text of the key that signs this request and every later message of this device."""
    invite_token: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{16,128}$")]
    seq: U64
    device_time_ms: TimeMs
    agent_version: ShortText = ""
    flower_key: FlowerPublicKey = ""
    """OpenSSH text of the device's Flower SuperNode key (P-256); the coordinator registers it with its SuperLink.
    Empty: the device does not take part in federated training."""


class DpParams(BaseModel):
    """Client-side fixed-clipping DP as applied by the ClientApp (Flower's fixedclipping_mod); noise is added at the
    server."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)
    clipping_norm: Annotated[float, Field(allow_inf_nan=False, gt=0.0, le=1e6)]
    noise_multiplier: Annotated[float, Field(allow_inf_nan=False, ge=0.0, le=1e6)]


MAX_CONTRIBUTION_BODY_BYTES = 8 * 1024
"""A body is under 1 KiB; anything much larger is not one, and is refused before it is parsed."""


class ContributionBody(CanonicalModel):
    """What one node did in one round of one Flower run: the contribution report before the agent signs it.

    The ClientApp writes exactly this (its `canonical_json`) into the spool (edge.federated.spool); the agent adds
    seq, device time and the round nonce and signs the result as a ContributionReport. `global_model_sha256` and
    `update_sha256` are `protocol.tasks.arrays.arrays_sha256` of the arrays received and returned; `examples` is
    self-reported and never an aggregation weight without a server-side cap. In drift-corrected jobs
    (protocol.tasks.drift) `gradient_sha256` is the hash of the gradient the node returned to the round's query and
    `drift_offset_sha256` that of the offset it trained with; both null otherwise.
    """

    run_id: U64
    round: Annotated[int, Field(ge=1, le=1_000_000)]
    """Flower's server round; Flower counts from 1."""
    node_id: U64
    task_id: Ident
    task_version: Annotated[int, Field(ge=1, le=1_000_000)]
    global_model_sha256: Sha256Hex
    update_sha256: Sha256Hex
    examples: Annotated[int, Field(ge=0, le=1 << 31)]
    dataset_fingerprint: Sha256Hex
    """The SHA-256 hex of the device's window set, without the window file's scheme prefix (docs/protocol.md)."""
    loss_before: Measurement
    loss_after: Measurement
    seconds: Measurement
    dp: DpParams | None = None
    gradient_sha256: Sha256Hex | None = None
    drift_offset_sha256: Sha256Hex | None = None

    @model_validator(mode="after")
    def _drift_hashes_together(self) -> Self:
        if (self.gradient_sha256 is None) != (self.drift_offset_sha256 is None):
            raise ValueError("gradient_sha256 and drift_offset_sha256 must be both set or both null")
        return self

    @classmethod
    def parse(cls, data: bytes) -> Self:
        """Parse the JSON bytes of a body; size is checked before parsing. Raises TooLargeError / MalformedError."""
        return _parse_bounded(cls, data, MAX_CONTRIBUTION_BODY_BYTES, "contribution body")


class ContributionReport(ContributionBody, WireMessage):
    """One device's signed contribution to one training round: the ClientApp's ContributionBody and what the agent
    adds when it signs it.

    v2, because v2 added the drift-correction hashes; v1 (no drift hashes) is retired (docs/protocol.md, Versioning).
    """

    PAYLOAD_TYPE: ClassVar[str] = _media_type("contribution-report", version=2)
    v: Literal[2] = 2
    seq: U64
    device_time_ms: TimeMs
    round_nonce: Nonce
    """The nonce of the MID's RoundInvitation to this run's job, as the signing device received it."""

    @classmethod
    def from_body(
        cls, body: ContributionBody, *, seq: int, device_time_ms: int, round_nonce: str
    ) -> ContributionReport:
        """The report the agent signs for `body`."""
        fields = {name: getattr(body, name) for name in ContributionBody.model_fields}
        return cls(**fields, seq=seq, device_time_ms=device_time_ms, round_nonce=round_nonce)


class DeviceStatus(StrEnum):
    IDLE = "idle"
    TRAINING = "training"
    PAUSED = "paused"
    STRIKING = "striking"
    LEFT = "left"
    """The member left this MID for good: it takes part in no job again (its outbox is still delivered)."""
    OFFLINE = "offline"
    """Only in a device's MQTT last will: the broker publishes it when the device vanishes without a goodbye."""


class Heartbeat(WireMessage):
    PAYLOAD_TYPE: ClassVar[str] = _media_type("heartbeat")
    v: Literal[1] = 1
    seq: U64
    device_time_ms: TimeMs
    # Lax only for the enum: it lets Python callers pass "idle"; JSON carries the value string either way.
    status: Annotated[DeviceStatus, Field(strict=False)]
    samples_stored: Annotated[int, Field(ge=0, le=1 << 40)] = 0
    outbox_pending: Annotated[int, Field(ge=0, le=1 << 31)] = 0
    agent_version: ShortText = ""


class KnobUpdate(WireMessage):
    """The member's one price knob: a bias in [-1, 1] carried as integer milli-units in [-1000, 1000]."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("knob-update")
    v: Literal[1] = 1
    seq: U64
    device_time_ms: TimeMs
    bias_milli: Annotated[int, Field(ge=-1000, le=1000)]


SensorKind = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.:-]{0,63}$")]
"""A kind of sensor, as a task input's `sources` name it and the sample store records it (protocol.tasks.spec)."""


class TaskSensors(CanonicalModel):
    """The kinds of sensor a member lets one task (by id, every version) train on; empty: none."""

    task_id: Ident
    sensors: Annotated[tuple[SensorKind, ...], Field(max_length=16)]

    @model_validator(mode="after")
    def _sorted_unique(self) -> Self:
        if list(self.sensors) != sorted(set(self.sensors)):
            raise ValueError("sensors must be sorted and unique")
        return self


class ConsentPolicy(WireMessage):
    """Which purposes the member allows and which buyers they refuse; replaces the previous policy as a whole.
    `any_purpose`: every purpose of the MID's vocabulary is allowed (then `allowed_purposes` is empty).
    `task_sensors`: per task, the kinds of sensor it may train on; a task not listed may use every sensor (left out
    of the encoding when empty, so a policy without it keeps its bytes)."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("consent-policy")
    v: Literal[1] = 1
    seq: U64
    device_time_ms: TimeMs
    allowed_purposes: Annotated[tuple[Ident, ...], Field(max_length=64)]
    denied_buyers: Annotated[tuple[Ident, ...], Field(max_length=256)] = ()
    any_purpose: bool = False
    task_sensors: Annotated[tuple[TaskSensors, ...], Field(max_length=64)] = ()

    @model_validator(mode="after")
    def _no_duplicates(self) -> Self:
        if self.any_purpose and self.allowed_purposes:
            raise ValueError("any_purpose allows every purpose: allowed_purposes must be empty")
        if len(set(self.allowed_purposes)) != len(self.allowed_purposes):
            raise ValueError("allowed_purposes has duplicates")
        if len(set(self.denied_buyers)) != len(self.denied_buyers):
            raise ValueError("denied_buyers has duplicates")
        tasks = [t.task_id for t in self.task_sensors]
        if tasks != sorted(set(tasks)):
            raise ValueError("task_sensors must be sorted by task_id and unique")
        return self

    @model_serializer(mode="wrap")
    def _without_task_sensors_when_none(self, handler: SerializerFunctionWrapHandler) -> object:
        dumped = handler(self)
        if isinstance(dumped, dict) and not self.task_sensors:
            dumped.pop("task_sensors", None)
        return dumped


def check_strike_span(target_buyer: str | None, target_purpose: str | None, start_ms: int, end_ms: int | None) -> None:
    """A strike names a buyer, a purpose or both, and ends (if it does) after it starts; raises ValueError otherwise.
    Shared by the signed vote and the member's own record of it (edge/agent/controls/state.py)."""
    if target_buyer is None and target_purpose is None:
        raise ValueError("a strike needs a target buyer, a target purpose, or both")
    if end_ms is not None and end_ms <= start_ms:
        raise ValueError("end_ms must be after start_ms")


def consent_excludes(
    allowed_purposes: Sequence[str] | None, denied_buyers: Sequence[str], buyer: str, purpose: str
) -> str | None:
    """Why a member's consent rules out a job of `buyer` for `purpose`, or None when it allows it.
    `allowed_purposes` None: every purpose. The agent declines such a job; the MID never selects the member for it."""
    if buyer in denied_buyers:
        return f"consent denies buyer {buyer}"
    if allowed_purposes is not None and purpose not in allowed_purposes:
        return f"consent does not allow purpose {purpose}"
    return None


def usable_sensors(sources_per_input: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The kinds of sensor a task can train on: those every one of its inputs takes (a sensor must have all of a
    task's inputs, protocol.tasks.spec.TaskInput), in the first input's order."""
    first, *others = sources_per_input
    return tuple(s for s in first if all(s in other for other in others))


def consent_sensor_gap(
    task_sensors: Sequence[TaskSensors], task_id: str, usable: Sequence[str]
) -> tuple[tuple[str, ...] | None, str | None]:
    """(the kinds of sensor the member's consent lets task `task_id` use among `usable` -- None: every one, the task
    is not listed --, why the consent rules the task out or None). The agent cuts windows only from those kinds and
    declines when there is none; the MID never selects a member whose consent gives the task no sensor."""
    for entry in task_sensors:
        if entry.task_id == task_id:
            allowed = tuple(s for s in usable if s in entry.sensors)
            if allowed:
                return allowed, None
            given, takes = ", ".join(entry.sensors) or "none", ", ".join(usable)
            return (), f"consent gives task {task_id} no sensor of its inputs (allowed: {given}; it takes: {takes})"
    return None, None


def strike_covers(target_buyer: str | None, target_purpose: str | None, buyer: str, purpose: str) -> bool:
    """True when a strike against `target_buyer` and/or `target_purpose` is against a job for `buyer` and `purpose`
    (a target left None matches any). The agent declines such a job; the MID does not wait for the striker."""
    return target_buyer in (None, buyer) and target_purpose in (None, purpose)


class StrikeVote(WireMessage):
    """A member joins (or leaves) a data strike against a buyer, a purpose, or a buyer for one purpose."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("strike-vote")
    v: Literal[1] = 1
    seq: U64
    device_time_ms: TimeMs
    target_buyer: Ident | None = None
    target_purpose: Ident | None = None
    start_ms: TimeMs
    end_ms: TimeMs | None = None
    """None: until the member withdraws the vote."""
    withdraw: bool = False

    @model_validator(mode="after")
    def _target_and_span(self) -> Self:
        check_strike_span(self.target_buyer, self.target_purpose, self.start_ms, self.end_ms)
        return self


class LeaveNotice(WireMessage):
    """The member leaves this MID for good (`midgate agent leave`). The MID logs it as a `leave` leaf, revokes the
    member's device keys and broker logins, and never selects the member again; royalties from models it helped train
    keep being split to it, and its departed device key can still sign StatementRequests (and nothing else)."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("leave-notice")
    v: Literal[1] = 1
    seq: U64
    device_time_ms: TimeMs
    left_ms: TimeMs
    """When the member chose to leave (`member.json`), as the device's clock said."""


# --- coordinator -> device (signed by the MID key) ----------------------------------------------------------------


class EnrolmentResponse(WireMessage):
    PAYLOAD_TYPE: ClassVar[str] = _media_type("enrolment-response")
    v: Literal[1] = 1
    mid: Ident
    device: Ident
    accepted: bool
    reason: ShortText = ""
    member: Ident | None = None
    mid_key: VerifierKeyText
    """C2SP verifier key text of the MID key that signs checkpoints, receipts and everything else sent down."""
    request_seq: U64
    issued_ms: TimeMs
    flower_node_id: U64 = 0
    """The SuperLink's node id for the request's `flower_key`; 0 when none was registered."""
    superlink: ShortText = ""
    """host:port of the MID's SuperLink the device's SuperNode connects to (TLS, MID CA); empty without one."""


class Receipt(WireMessage):
    """The coordinator logged a report: bound to it by key id, seq and envelope hash, with a C2SP tlog-proof."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("receipt")
    v: Literal[1] = 1
    device_key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}$")]
    seq: U64
    envelope_sha256: Sha256Hex
    leaf_index: U64
    tlog_proof: Annotated[str, StringConstraints(min_length=1, max_length=32 * 1024)]
    """C2SP tlog-proof text (format in docs/ledger.md), verified by protocol's ledger code, not here."""
    issued_ms: TimeMs


B64Hash = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]{43}=$")]
"""A 32-byte hash in standard base64 (as in C2SP tlog-proof lines)."""
MAX_RECEIPT_BATCH_BYTES = 256 * 1024
"""The broker's max_packet_size (docs/messaging.md): a batch that large could not have been delivered."""


class ReceiptPath(BaseModel):
    """One report in a ReceiptBatch: its seq, where it sits in the log, and its RFC 9162 inclusion path."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)
    seq: U64
    leaf_index: U64
    path: Annotated[tuple[B64Hash, ...], Field(max_length=64)]


class ReceiptBatch(WireMessage):
    """Receipts for one device's reports of one ledger batch: the signed checkpoint once, then one path per report.

    Not a DSSE envelope and not signed as a whole: each path proves `Leaf(kind, envelope)` -- the exact bytes the
    device signed, so its key, seq and content -- under the MID-signed checkpoint. A forged batch can only fail to
    verify. One message per device per batch instead of one signed Receipt per report (measured: the per-report
    signature and MQTT publish were a fifth of ingest's CPU).
    """

    PAYLOAD_TYPE: ClassVar[str] = _media_type("receipt-batch")
    v: Literal[1] = 1
    checkpoint: Annotated[str, StringConstraints(min_length=1, max_length=32 * 1024)]
    """The C2SP tlog-checkpoint signed note every path in `receipts` leads to."""
    receipts: Annotated[tuple[ReceiptPath, ...], Field(min_length=1, max_length=1024)]
    issued_ms: TimeMs

    @classmethod
    def parse(cls, data: bytes) -> ReceiptBatch:
        """Parse the JSON bytes of a batch; size is checked before parsing. Raises TooLargeError / MalformedError."""
        return _parse_bounded(cls, data, MAX_RECEIPT_BATCH_BYTES, "receipt batch")


def _quoted_b64(hashes: Sequence[bytes]) -> str:
    return ",".join(['"' + b2a_base64(h, newline=False).decode() + '"' for h in hashes])


def receipt_batch_json(
    checkpoint: bytes, receipts: Sequence[tuple[int, int, Sequence[bytes]]], issued_ms: int
) -> bytes:
    """`ReceiptBatch(...).canonical_json()` without building models: the coordinator's per-report hot path.

    `receipts` holds (seq, leaf_index, inclusion path); callers pass values they produced themselves.
    """
    paths = ",".join(
        f'{{"leaf_index":"{index}","path":[{_quoted_b64(path)}],"seq":"{seq}"}}' for seq, index, path in receipts
    )
    note = json.dumps(checkpoint.decode(), ensure_ascii=False)
    return f'{{"checkpoint":{note},"issued_ms":{issued_ms},"receipts":[{paths}],"v":1}}'.encode()


class KeyRevocation(WireMessage):
    """The MID revoked a device key: recorded in the log as a `key-revoke` leaf, signed by the MID key, so members
    can audit that reports signed by the key after `revoked_ms` were refused."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("key-revocation")
    v: Literal[1] = 1
    mid: Ident
    device: Ident
    device_key: VerifierKeyText
    """C2SP verifier key text of the revoked key."""
    revoked_ms: TimeMs
    reason: ShortText = ""


class CheckpointAnnouncement(WireMessage):
    PAYLOAD_TYPE: ClassVar[str] = _media_type("checkpoint-announcement")
    v: Literal[1] = 1
    tree_size: U64
    checkpoint: Annotated[str, StringConstraints(min_length=1, max_length=32 * 1024)]
    """The C2SP tlog-checkpoint signed note, as text."""
    issued_ms: TimeMs


class RoundInvitation(WireMessage):
    PAYLOAD_TYPE: ClassVar[str] = _media_type("round-invitation")
    v: Literal[1] = 1
    job_id: Ident
    run_id: U64
    round: Annotated[int, Field(ge=0, le=1_000_000)]
    task_id: Ident
    task_version: Annotated[int, Field(ge=1, le=1_000_000)]
    purpose: Ident
    buyer: Ident
    nonce: Nonce
    issued_ms: TimeMs
    deadline_ms: TimeMs

    @model_validator(mode="after")
    def _deadline_after_issue(self) -> Self:
        if self.deadline_ms <= self.issued_ms:
            raise ValueError("deadline_ms must be after issued_ms")
        return self


ReasonCode = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z_]{0,63}$")]
"""A `protocol.errors.Reason` value (docs/protocol.md, reason codes)."""


class Refusal(WireMessage):
    """The MID refused one of this device's reports for good: the device stops resending it and keeps it, with the
    reason, for the member to see. Bound to the report by key id, seq and the SHA-256 of its exact envelope bytes, so
    it can only settle the report it names. Not sent for transient refusals (`rate_limited`), which a resend cures."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("refusal")
    v: Literal[1] = 1
    device_key_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}$")]
    seq: U64
    envelope_sha256: Sha256Hex
    reason: ReasonCode
    detail: ShortText = ""
    """What was expected and what was found, for the member (e.g. the update hash the MID received)."""
    issued_ms: TimeMs


class StatementLine(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)
    kind: Literal["training", "royalty", "fee", "adjustment"]
    job_id: Ident | None = None
    model_version: ShortText = ""
    amount_minor: MinorUnits
    memo: ShortText = ""


class Statement(WireMessage):
    """A member's statement for one period: every line in integer minor units, and their exact total."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("statement")
    v: Literal[1] = 1
    mid: Ident
    member: Ident
    currency: Currency
    period_start_ms: TimeMs
    period_end_ms: TimeMs
    lines: Annotated[tuple[StatementLine, ...], Field(max_length=1000)]
    total_minor: MinorUnits
    checkpoint_size: U64
    """Tree size of the ledger checkpoint the statement was computed from, so the member can audit it."""
    issued_ms: TimeMs

    @model_validator(mode="after")
    def _total_and_period(self) -> Self:
        if self.period_end_ms <= self.period_start_ms:
            raise ValueError("period_end_ms must be after period_start_ms")
        if sum(line.amount_minor for line in self.lines) != self.total_minor:
            raise ValueError("total_minor must equal the sum of the lines")
        return self


class StatementRequest(WireMessage):
    """A member's device asks its MID for the member's settlement and royalty leaves, with inclusion proofs
    (HTTP `POST /v1/member/statement`). Signed by the device key; the MID answers with the lines of the member the
    device belongs to, and only those.

    It carries no `seq`: it is a read, signed by `midgate agent statement` while the daemon owns the device's seq
    counter, and it changes nothing at the MID. A fresh nonce and `issued_ms` make it unreplayable instead: the MID
    refuses a request outside its time window (`stale_request`) and a nonce it has seen within it (`replayed`)."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("statement-request")
    v: Literal[1] = 1
    mid: Ident
    device: Ident
    period_start_ms: TimeMs
    period_end_ms: TimeMs
    nonce: Nonce
    """128 random bits drawn by the device for this request alone."""
    issued_ms: TimeMs

    @model_validator(mode="after")
    def _period(self) -> Self:
        if self.period_end_ms <= self.period_start_ms:
            raise ValueError("period_end_ms must be after period_start_ms")
        return self


# --- buyer -> coordinator (signed by the buyer key; `seq` unique per key) ------------------------------------------


class RevenueReport(WireMessage):
    """A buyer reports revenue earned with a model over a period; the MID splits it among the model's contributors
    as a ROYALTY leaf. Posted to the coordinator's buyer API (`POST /v1/buyer/revenue`), signed by a registered buyer
    key; a (key, seq) is accepted once."""

    PAYLOAD_TYPE: ClassVar[str] = _media_type("revenue-report")
    v: Literal[1] = 1
    mid: Ident
    buyer: Ident
    model_id: Ident
    model_version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:\-]{1,128}$")]
    """The model version as named in its settlement record."""
    period_start_ms: TimeMs
    period_end_ms: TimeMs
    amount_minor: Annotated[int, Field(ge=0, le=1 << 53)]
    currency: Currency
    seq: U64
    issued_ms: TimeMs

    @model_validator(mode="after")
    def _period(self) -> Self:
        if self.period_end_ms <= self.period_start_ms:
            raise ValueError("period_end_ms must be after period_start_ms")
        return self


MESSAGE_TYPES: tuple[type[WireMessage], ...] = (
    EnrolmentRequest,
    EnrolmentResponse,
    ContributionReport,
    Heartbeat,
    Receipt,
    ReceiptBatch,
    KeyRevocation,
    CheckpointAnnouncement,
    RoundInvitation,
    KnobUpdate,
    ConsentPolicy,
    StrikeVote,
    LeaveNotice,
    Statement,
    RevenueReport,
    Refusal,
    StatementRequest,
)
MESSAGE_BY_PAYLOAD_TYPE: dict[str, type[WireMessage]] = {m.PAYLOAD_TYPE: m for m in MESSAGE_TYPES}


def require_newer_seq(last_seq: int | None, seq: int, key_id: str) -> None:
    """Replay rule: a key's seq must be strictly greater than the last one accepted from it (None: none yet)."""
    if last_seq is not None and seq <= last_seq:
        raise ReplayedError("seq is not greater than the last accepted one", key_id=key_id, last=last_seq, found=seq)


def open_enrolment_request(data: bytes) -> tuple[VerifiedPayload, EnrolmentRequest]:
    """Verify a self-signed enrolment request: the one message whose signer key travels inside its payload.

    The payload is parsed before the signature is checked (there is no other way to learn the key), but only
    after the envelope's size and strictness checks, and only by the strict EnrolmentRequest model. The result proves
    possession of the key; whether the device may join is the invite's business (coordinator).
    """
    payload_type, payload, key_ids = peek_envelope(data)
    request = parse_unverified_payload(payload_type, payload, EnrolmentRequest)
    try:
        key = VerifierKey.parse(request.device_key)
    except BadKeyError as exc:
        raise MalformedError("device_key is not a C2SP verifier key", detail=exc.message) from None
    try:
        verified = open_envelope(data, {key.key_id.hex(): key}, EnrolmentRequest.PAYLOAD_TYPE)
    except UnknownKeyError:
        raise BadSignatureError("enrolment request is not signed by the key it enrols", key_ids=key_ids) from None
    return verified, request


__all__ = [
    "MAX_CONTRIBUTION_BODY_BYTES",
    "MAX_RECEIPT_BATCH_BYTES",
    "MAX_TIME_MS",
    "MESSAGE_BY_PAYLOAD_TYPE",
    "MESSAGE_TYPES",
    "MIN_TIME_MS",
    "U64",
    "U64_MAX",
    "CanonicalModel",
    "CheckpointAnnouncement",
    "ConsentPolicy",
    "ContributionBody",
    "ContributionReport",
    "DeviceStatus",
    "DpParams",
    "EnrolmentRequest",
    "EnrolmentResponse",
    "Heartbeat",
    "Ident",
    "KeyRevocation",
    "KnobUpdate",
    "LeaveNotice",
    "Receipt",
    "ReceiptBatch",
    "ReceiptPath",
    "Refusal",
    "RevenueReport",
    "RoundInvitation",
    "Statement",
    "StatementLine",
    "StatementRequest",
    "StrikeVote",
    "TimeMs",
    "WireMessage",
    "check_strike_span",
    "consent_excludes",
    "open_enrolment_request",
    "receipt_batch_json",
    "require_newer_seq",
    "strike_covers",
]
