"""Canonical serialisation and SHA-256 of a model's named arrays.

The device hashes the global model it received and the update it returns; the coordinator recomputes both from
what Flower delivered and compares. Flower's own byte encoding (numpy .npy inside an ArrayRecord) is an
implementation detail that may change between versions, so the hash is over this explicit encoding instead:

    "midgate-arrays-v1\\n" || u32(count) || for each array, names in ascending UTF-8 byte order:
        u32(len(name)) || name || u32(len(dtype)) || dtype || u32(ndim) || u64(dim)* || u64(len(data)) || data

with big-endian integers, `dtype` the numpy type string in little-endian form (e.g. "<f4"), and `data` the array's
C-order bytes in that dtype. numpy only, no torch.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from protocol.errors import MalformedError, TooLargeError

DOMAIN = b"midgate-arrays-v1\n"
MAX_ARRAYS = 4096
MAX_NAME_BYTES = 1024
MAX_TOTAL_BYTES = 1 << 31
_ALLOWED_KINDS = frozenset("fiub")  # float, signed, unsigned, bool: the kinds a model's state holds


def canonical_dtype(dtype: np.dtype[np.generic]) -> np.dtype[np.generic]:
    """The little-endian form of a numeric dtype; rejects object, string and structured dtypes."""
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None:
        raise MalformedError("array dtype is not numeric", dtype=str(dtype))
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def _frames(arrays: Mapping[str, npt.NDArray[np.generic]]) -> list[bytes]:
    if len(arrays) > MAX_ARRAYS:
        raise TooLargeError("too many arrays", limit=MAX_ARRAYS, found=len(arrays))
    names = sorted(arrays, key=lambda n: n.encode())
    frames = [DOMAIN, struct.pack(">I", len(names))]
    total = 0
    for name in names:
        raw_name = name.encode()
        if not raw_name or len(raw_name) > MAX_NAME_BYTES:
            raise MalformedError("array name must be 1..1024 bytes", name=name[:64])
        array = np.asarray(arrays[name])
        dtype = canonical_dtype(array.dtype)
        data = np.ascontiguousarray(array, dtype=dtype).tobytes(order="C")
        total += len(data)
        if total > MAX_TOTAL_BYTES:
            raise TooLargeError("arrays too large to hash", limit=MAX_TOTAL_BYTES)
        type_str = dtype.str.encode()
        frames += [struct.pack(">I", len(raw_name)), raw_name, struct.pack(">I", len(type_str)), type_str]
        frames.append(struct.pack(f">I{array.ndim}Q", array.ndim, *array.shape))
        frames += [struct.pack(">Q", len(data)), data]
    return frames


def canonical_bytes(arrays: Mapping[str, npt.NDArray[np.generic]]) -> bytes:
    """The canonical encoding above; for tests and external verifiers (hashing does not build it whole)."""
    return b"".join(_frames(arrays))


def arrays_sha256(arrays: Mapping[str, npt.NDArray[np.generic]]) -> str:
    """Lower-case hex SHA-256 of the canonical encoding of named arrays."""
    digest = hashlib.sha256()
    for frame in _frames(arrays):
        digest.update(frame)
    return digest.hexdigest()
