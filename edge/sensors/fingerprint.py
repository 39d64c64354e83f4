"""Dataset fingerprint: a commitment to exactly the windows a training round used, without revealing them.

Each window hashes to `window_hash` (domain-separated SHA-256 over its start time, label, shape and float32 bytes);
the fingerprint is the RFC 9162 §2.1 Merkle tree hash over those window hashes as leaves, in the order the round
used them. A member can later prove that one window was in the round with an ordinary inclusion proof against the
fingerprint, which protocol/merkle.py checks.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

from protocol.merkle import merkle_root

WINDOW_HASH_DOMAIN = b"midgate.window.v1\x00"
_WINDOW_HEADER = struct.Struct(">qqII")  # t_start_ms, label (-1 = none), channels, length


def window_hash(t_start_ms: int, label: int, window: np.ndarray) -> bytes:
    """SHA-256 of one window. Requires `window` shaped (channels, length); values are hashed as little-endian
    float32 so that the same window hashes the same on every device."""
    if window.ndim != 2:
        raise ValueError(f"window must be (channels, length), got shape {window.shape}")
    channels, length = window.shape
    body = np.ascontiguousarray(window, dtype="<f4").tobytes()
    return hashlib.sha256(WINDOW_HASH_DOMAIN + _WINDOW_HEADER.pack(t_start_ms, label, channels, length) + body).digest()


def dataset_fingerprint(window_hashes: Sequence[bytes]) -> bytes:
    """The fingerprint a contribution report names: the Merkle root of the window hashes a round used."""
    for h in window_hashes:
        if len(h) != 32:
            raise ValueError(f"window hash must be 32 bytes, got {len(h)}")
    return merkle_root(window_hashes)
