"""A task spec signed by the MID: the only form in which a device accepts a task.

The signature is the wire protocol's own (a DSSE envelope, protocol.envelope) over the spec's canonical JSON under
`TaskSpec.PAYLOAD_TYPE`; the spec's size is bounded before its schema is parsed. A device trusts exactly one key for
this, its MID's, so neither a buyer nor another MID can put a task on it.
"""

from __future__ import annotations

from protocol.envelope import decode, open_envelope, seal
from protocol.errors import MalformedError, TooLargeError
from protocol.identity import SignerKey, VerifierKey
from protocol.tasks.spec import MAX_TASK_SPEC_BYTES, TaskSpec

MAX_SIGNED_TASK_SPEC_BYTES = MAX_TASK_SPEC_BYTES * 4 // 3 + 1024
"""A signed spec's envelope: the base64 of a spec at its size limit and one signature."""


def seal_task_spec(spec: TaskSpec, mid_key: SignerKey) -> bytes:
    """The spec's canonical JSON in a DSSE envelope signed by the MID's key."""
    payload = spec.canonical_json()
    if len(payload) > MAX_TASK_SPEC_BYTES:
        raise TooLargeError("task spec exceeds the size limit", limit=MAX_TASK_SPEC_BYTES, found=len(payload))
    return seal(TaskSpec.PAYLOAD_TYPE, payload, mid_key)


def open_task_spec(
    envelope: bytes, mid_key: VerifierKey, *, task_id: str | None = None, version: int | None = None
) -> TaskSpec:
    """Verify a signed spec against the MID's key and parse it (strict schema, vetted family, bounds); with `task_id`
    and `version`, the spec must be that task. Raises only ProtocolError subclasses: too_large, malformed (also a
    spec of another task), bad_signature (tampered), unknown_key (not signed by the MID), wrong_type."""
    if len(envelope) > MAX_SIGNED_TASK_SPEC_BYTES:
        raise TooLargeError(
            "signed task spec exceeds the size limit", limit=MAX_SIGNED_TASK_SPEC_BYTES, found=len(envelope)
        )
    verified = open_envelope(envelope, {mid_key.key_id.hex(): mid_key}, TaskSpec.PAYLOAD_TYPE)
    if len(verified.payload) > MAX_TASK_SPEC_BYTES:
        raise TooLargeError("task spec exceeds the size limit", limit=MAX_TASK_SPEC_BYTES, found=len(verified.payload))
    spec = decode(verified, TaskSpec)
    if (task_id, version) != (None, None) and (spec.id, spec.version) != (task_id, version):
        raise MalformedError("signed spec is of another task", expected=f"{task_id}@{version}", found=spec.key)
    return spec
