"""A model's named arrays as one Flower Array on the wire, to cut the SuperLink's per-object work.

Flower stores and transfers every Array of a message as its own objects (the Array and its chunk), each one HTTP
request between SuperNode, SuperLink and ServerApp. A plaid-appliance@1 message is 16 objects, 12 of them its six
arrays, and on the bench's shared 2-core machine the SuperLink's per-request cost made pulling and pushing them most
of a round (bench/fl_bench.py rounds --timeline). Packed, a message is 6 objects.

The packed form is the layout of the canonical encoding (protocol/tasks/arrays.py: names, dtypes, shapes and bytes)
under its own domain line, with the arrays in the record's own order rather than sorted, because Flower's
fixedclipping_mod requires the reply's array names in the order the ClientApp received them. It is held as a uint8
Array under the single key `PACKED_KEY`. Packing happens only at the Flower boundary (the
ServerApp's grid, the ClientApp's outermost mod), so the strategy, the captures and the contribution records all see
and hash the named arrays, exactly as without packing. Unpacking is a trust boundary: the ServerApp unpacks what
devices send, so every length is checked before it is used and nothing may be left over.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, RecordDict

from protocol.errors import MalformedError, TooLargeError
from protocol.tasks.arrays import MAX_ARRAYS, MAX_NAME_BYTES, MAX_TOTAL_BYTES, canonical_dtype

PACKED_KEY = "midgate-packed-v1"
DOMAIN = b"midgate-packed-v1\n"
MAX_NDIM = 32
MAX_DTYPE_BYTES = 16


class _Reader:
    """Bounds-checked reads from the front of a byte string."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.at = 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self.data) - self.at:
            raise MalformedError("packed arrays end early", field=what, expected=size, found=len(self.data) - self.at)
        chunk = bytes(self.data[self.at : self.at + size])
        self.at += size
        return chunk

    def u32(self, what: str) -> int:
        return int(struct.unpack(">I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack(">Q", self.take(8, what))[0])


def pack_arrays(arrays: Mapping[str, npt.NDArray[np.generic]]) -> bytes:
    """DOMAIN || u32(count) || per array, in the mapping's order: u32(len(name)) || name || u32(len(dtype)) || dtype
    || u32(ndim) || u64(dim)* || u64(len(data)) || data; big-endian, dtype little-endian, data C-order."""
    if len(arrays) > MAX_ARRAYS:
        raise TooLargeError("too many arrays", limit=MAX_ARRAYS, found=len(arrays))
    frames = [DOMAIN, struct.pack(">I", len(arrays))]
    for name, value in arrays.items():
        raw_name = name.encode()
        if not 1 <= len(raw_name) <= MAX_NAME_BYTES:
            raise MalformedError("array name must be 1..1024 bytes", name=name[:64])
        array = np.asarray(value)
        dtype = canonical_dtype(array.dtype)
        data = np.ascontiguousarray(array, dtype=dtype).tobytes(order="C")
        type_str = dtype.str.encode()
        frames += [struct.pack(">I", len(raw_name)), raw_name, struct.pack(">I", len(type_str)), type_str]
        frames += [struct.pack(f">I{array.ndim}Q", array.ndim, *array.shape), struct.pack(">Q", len(data)), data]
    return b"".join(frames)


def unpack_arrays(data: bytes) -> dict[str, npt.NDArray[np.generic]]:
    """The named arrays of `pack_arrays`, in their order; raises MalformedError/TooLargeError on anything else (wrong
    domain, counts or lengths beyond the limits, a non-numeric or non-canonical dtype, shape and byte count that
    disagree, a repeated name, trailing bytes)."""
    if len(data) > MAX_TOTAL_BYTES + (1 << 20):
        raise TooLargeError("packed arrays too large", limit=MAX_TOTAL_BYTES, found=len(data))
    reader = _Reader(data)
    if reader.take(len(DOMAIN), "domain") != DOMAIN:
        raise MalformedError("packed arrays have another domain", expected=DOMAIN.decode().strip())
    count = reader.u32("count")
    if count > MAX_ARRAYS:
        raise TooLargeError("too many packed arrays", limit=MAX_ARRAYS, found=count)
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for _ in range(count):
        name = _read_name(reader)
        if name in arrays:
            raise MalformedError("packed array name repeated", name=name[:64])
        arrays[name] = _read_array(reader)
    if reader.at != len(data):
        raise MalformedError("bytes after the packed arrays", expected=reader.at, found=len(data))
    return arrays


def _read_name(reader: _Reader) -> str:
    size = reader.u32("name length")
    if not 1 <= size <= MAX_NAME_BYTES:
        raise MalformedError("array name must be 1..1024 bytes", found=size)
    try:
        return reader.take(size, "name").decode()
    except UnicodeDecodeError as exc:
        raise MalformedError("array name is not UTF-8") from exc


def _read_array(reader: _Reader) -> npt.NDArray[np.generic]:
    type_size = reader.u32("dtype length")
    if not 1 <= type_size <= MAX_DTYPE_BYTES:
        raise MalformedError("dtype string of a wrong length", found=type_size)
    type_str = reader.take(type_size, "dtype").decode(errors="replace")
    try:
        dtype = np.dtype(type_str)
    except TypeError as exc:
        raise MalformedError("unknown dtype", dtype=type_str) from exc
    if canonical_dtype(dtype).str != type_str:
        raise MalformedError("dtype not in canonical form", expected=canonical_dtype(dtype).str, found=type_str)
    ndim = reader.u32("ndim")
    if ndim > MAX_NDIM:
        raise MalformedError("too many dimensions", limit=MAX_NDIM, found=ndim)
    shape = tuple(reader.u64("dim") for _ in range(ndim))
    size = reader.u64("data length")
    expected = dtype.itemsize * int(np.prod(shape, dtype=object))
    if size != expected:
        raise MalformedError("array bytes do not match its shape", expected=expected, found=size)
    raw = reader.take(size, "data")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """One uint8 Array holding `pack_arrays` of the record's arrays, in the record's order."""
    blob = pack_arrays({name: array.numpy() for name, array in record.items()})
    return ArrayRecord({PACKED_KEY: Array(np.frombuffer(blob, dtype=np.uint8))})


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED_KEY]


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The named arrays of a packed record (MalformedError/TooLargeError if it is not a valid one)."""
    blob = record[PACKED_KEY].numpy()
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise MalformedError("packed arrays must be a 1-D uint8 array", found=f"{blob.dtype}{blob.shape}")
    return ArrayRecord({name: Array(value) for name, value in unpack_arrays(blob.tobytes()).items()})


def pack_content(content: RecordDict) -> RecordDict:
    """The same records, each ArrayRecord of more than one array packed (a single array gains nothing)."""
    packed = RecordDict()
    for key, record in content.items():
        multi = isinstance(record, ArrayRecord) and len(record) > 1
        packed[key] = pack_record(record) if multi else record  # type: ignore[arg-type]
    return packed


def content_is_packed(content: RecordDict) -> bool:
    return any(is_packed(record) for record in content.array_records.values())


def unpack_content(content: RecordDict) -> RecordDict:
    """The same records with every packed ArrayRecord unpacked."""
    unpacked = RecordDict()
    for key, record in content.items():
        packed = isinstance(record, ArrayRecord) and is_packed(record)
        unpacked[key] = unpack_record(record) if packed else record  # type: ignore[arg-type]
    return unpacked
