"""The packed wire form of a model's arrays (protocol/tasks/packed.py): what the ServerApp's grid and the ClientApp's
outermost mod (edge.federated.acceleration.packed_arrays) exchange instead of one Flower Array per tensor. Unpacking
is a trust boundary (devices' replies), so every malformed packing is refused with a reason, and a round trip
changes no canonical hash."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from edge.federated.acceleration.packed_arrays import packed_arrays_mod
from protocol.errors import MalformedError, ProtocolError, TooLargeError
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.models import build_model, model_arrays
from protocol.tasks.packed import (
    DOMAIN,
    PACKED_KEY,
    content_is_packed,
    pack_arrays,
    pack_content,
    pack_record,
    unpack_arrays,
    unpack_content,
    unpack_record,
)
from protocol.tasks.spec import get_task

MODEL = model_arrays(build_model(get_task("plaid-appliance", 1), seed=3))


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in arrays.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def test_round_trip_keeps_names_shapes_dtypes_values_and_hash() -> None:
    mixed = {**MODEL, "steps": np.array([3], dtype=np.int64), "mask": np.array([[True, False]])}
    packed = pack_record(_record(mixed))
    assert list(packed.keys()) == [PACKED_KEY] and packed[PACKED_KEY].numpy().dtype == np.uint8
    back = _numpy(unpack_record(packed))
    assert list(back) == list(mixed)  # the record's order: Flower's fixedclipping_mod compares name lists
    assert arrays_sha256(back) == arrays_sha256(mixed)
    for name, value in mixed.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


def test_content_packs_only_multi_array_records_and_unpacks_to_the_same_records() -> None:
    content = RecordDict(
        {
            "arrays": _record(MODEL),
            "one": _record({"w": np.ones(3, dtype=np.float32)}),
            "config": ConfigRecord({"server-round": 2}),
            "metrics": MetricRecord({"num-examples": 64}),
        }
    )
    packed = pack_content(content)
    assert content_is_packed(packed) and not content_is_packed(content)
    assert list(packed["arrays"].keys()) == [PACKED_KEY]
    assert list(packed["one"].keys()) == ["w"]
    back = unpack_content(packed)
    assert list(back.keys()) == ["arrays", "one", "config", "metrics"]
    assert arrays_sha256(_numpy(back.array_records["arrays"])) == arrays_sha256(MODEL)
    assert back.config_records["config"]["server-round"] == 2


def _tampered(blob: bytes, at: int, value: bytes) -> bytes:
    return blob[:at] + value + blob[at + len(value) :]


GOOD = pack_arrays({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, dtype=np.int64)})
A_NAME = len(DOMAIN) + 4  # offset of the first name's length
A_DTYPE = A_NAME + 4 + 1  # offset of its dtype length
A_NDIM = A_DTYPE + 4 + 3  # "<f4"
A_DATA_LEN = A_NDIM + 4 + 16


@pytest.mark.parametrize(
    ("blob", "error", "complaint"),
    [
        (b"midgate-arrays-v1\n" + GOOD[len(DOMAIN) :], MalformedError, "another domain"),
        (GOOD[:-1], MalformedError, "end early"),
        (GOOD + b"\x00", MalformedError, "bytes after"),
        (_tampered(GOOD, len(DOMAIN), struct.pack(">I", 5000)), TooLargeError, "too many"),
        (_tampered(GOOD, len(DOMAIN), struct.pack(">I", 3)), MalformedError, "end early"),
        (_tampered(GOOD, A_NAME, struct.pack(">I", 0)), MalformedError, "1..1024"),
        (_tampered(GOOD, A_DTYPE + 4, b"|O8"[:3]), MalformedError, "not numeric"),
        (_tampered(GOOD, A_DTYPE + 4, b">f4"), MalformedError, "canonical"),
        (_tampered(GOOD, A_DTYPE + 4, b"<x4"), MalformedError, "unknown dtype"),
        (_tampered(GOOD, A_NDIM, struct.pack(">I", 33)), MalformedError, "dimensions"),
        (_tampered(GOOD, A_DATA_LEN, struct.pack(">Q", 20)), MalformedError, "do not match its shape"),
        (_tampered(GOOD, A_NAME + 4, b"b"), MalformedError, "repeated"),
    ],
)
def test_unpacking_refuses_anything_but_a_canonical_encoding(
    blob: bytes, error: type[ProtocolError], complaint: str
) -> None:
    assert unpack_arrays(GOOD).keys() == {"a", "b"}
    with pytest.raises(error) as raised:
        unpack_arrays(blob)
    assert complaint in str(raised.value)


def test_unpacking_refuses_a_packed_array_that_is_not_bytes() -> None:
    record = ArrayRecord({PACKED_KEY: Array(np.zeros(4, dtype=np.float32))})
    with pytest.raises(MalformedError, match="1-D uint8"):
        unpack_record(record)


def _message(content: RecordDict) -> Message:
    return Message(content=content, dst_node_id=7, message_type="train", group_id="1")


@pytest.mark.usefixtures("in_a_task")
def test_client_mod_unpacks_for_the_app_and_packs_its_reply() -> None:
    seen: dict[str, object] = {}

    def app(msg: Message, context: Context) -> Message:
        seen["names"] = sorted(msg.content.array_records["arrays"].keys())
        update = {k: v + 1 for k, v in _numpy(msg.content.array_records["arrays"]).items()}
        seen["update"] = arrays_sha256(update)
        return Message(content=RecordDict({"arrays": _record(update)}), reply_to=msg)

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = packed_arrays_mod(_message(pack_content(RecordDict({"arrays": _record(MODEL)}))), context, app)
    assert seen["names"] == sorted(MODEL)
    assert content_is_packed(reply.content)
    assert arrays_sha256(_numpy(unpack_content(reply.content).array_records["arrays"])) == seen["update"]
    # Unpacked in, unpacked out (Flower's default configuration).
    plain = packed_arrays_mod(_message(RecordDict({"arrays": _record(MODEL)})), context, app)
    assert not content_is_packed(plain.content)
