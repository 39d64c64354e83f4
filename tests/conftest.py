"""Shared fixtures: the public test vectors in ../shared/testvectors, read in place and never copied."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread in the test processes. The suite runs two workers on CI's two cores, beside the services the
    tests start: with torch's default of a thread per core, the workers' tiny models spin on each other's cores and
    train 5-25 times slower (measured at load 10: a GRU's 15 epochs 60 s with 2 threads, 9 s with 1)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; a broken install fails the tests that use it
        return
    torch.set_num_threads(1)


VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors"

VECTOR_SOURCES = {
    "merkle": "transparency-dev/merkle testdata/inclusion and testdata/consistency",
    "ed25519": "C2SP/wycheproof testvectors_v1/ed25519_test.json",
    "signed-note": "the C2SP signed-note.md example and golang.org/x/mod sumdb/note ExampleSign",
}


def vectors_dir(kind: str) -> Path:
    """The folder of one kind of public vectors; skips the test, naming the public source, when it is absent."""
    path = VECTORS / kind
    if not path.exists():
        pytest.skip(f"{path} not found: these tests read public vectors from {VECTOR_SOURCES[kind]}")
    return path


@pytest.fixture
def in_a_task() -> Iterator[None]:
    """Flower builds messages only inside a task (it stamps the run and node from TaskIdentity)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 3
    yield
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None  # type: ignore[assignment]
