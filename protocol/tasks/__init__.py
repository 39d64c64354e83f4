"""Versioned training tasks both sides agree on. Torch-free: models are in `protocol.tasks.models`.

numpy-free too until an array is hashed: the agent checks invitations against the task registry but must not pay
numpy's 20 MB for it on a 512 MB board (BENCHMARKS.md, "Raspberry Pi hub"); `arrays_sha256` and `canonical_bytes`
are imported from `protocol.tasks.arrays` on first use, and the built-in specs (`REGISTRY`) parsed on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocol.tasks.spec import TaskKind, TaskSpec, UnknownTaskError, get_task

if TYPE_CHECKING:
    from protocol.tasks.arrays import arrays_sha256, canonical_bytes
    from protocol.tasks.spec import REGISTRY

__all__ = [
    "REGISTRY",
    "TaskKind",
    "TaskSpec",
    "UnknownTaskError",
    "arrays_sha256",
    "canonical_bytes",
    "get_task",
]


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        from protocol.tasks import spec

        return spec.REGISTRY
    if name in ("arrays_sha256", "canonical_bytes"):
        from protocol.tasks import arrays

        return getattr(arrays, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
