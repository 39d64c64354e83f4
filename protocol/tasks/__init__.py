"""Versioned training tasks both sides agree on. Torch-free: models are in `protocol.tasks.models`."""

from protocol.tasks.arrays import arrays_sha256, canonical_bytes
from protocol.tasks.spec import REGISTRY, TaskKind, TaskSpec, UnknownTaskError, get_task

__all__ = [
    "REGISTRY",
    "TaskKind",
    "TaskSpec",
    "UnknownTaskError",
    "arrays_sha256",
    "canonical_bytes",
    "get_task",
]
