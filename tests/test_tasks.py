"""protocol.tasks: the registry, canonical array hashing, contribution records, window files and the models."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol.errors import MalformedError, Reason
from protocol.tasks import REGISTRY, TaskKind, UnknownTaskError, arrays_sha256, canonical_bytes, get_task
from protocol.tasks.windows import WindowSet, load_window_file, save_window_file, window_fingerprint


def test_importing_protocol_tasks_does_not_import_torch() -> None:
    code = "import sys, protocol, protocol.tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_registry_has_the_three_required_tasks() -> None:
    kinds = {spec.id: spec.kind for spec in REGISTRY.values()}
    assert kinds == {
        "plaid-appliance": TaskKind.CLASSIFICATION,
        "env-forecast": TaskKind.FORECAST,
        "host-anomaly": TaskKind.AUTOENCODER,
    }
    assert len(get_task("plaid-appliance", 1).labels) == 11


@pytest.mark.parametrize(("task_id", "version"), [("plaid-appliance", 2), ("no-such-task", 1)])
def test_unknown_task_is_a_typed_error(task_id: str, version: int) -> None:
    with pytest.raises(UnknownTaskError) as err:
        get_task(task_id, version)
    assert err.value.reason is Reason.UNKNOWN_TASK
    assert err.value.details["task_id"] == task_id


def test_canonical_bytes_follow_the_documented_layout() -> None:
    arrays = {"b": np.array([1.0], dtype=np.float32), "a": np.array([[1, 2]], dtype=np.int64)}
    expected = b"midgate-arrays-v1\n" + struct.pack(">I", 2)
    a_data = np.array([[1, 2]], dtype="<i8").tobytes()
    expected += struct.pack(">I", 1) + b"a" + struct.pack(">I", 3) + b"<i8" + struct.pack(">IQQ", 2, 1, 2)
    expected += struct.pack(">Q", len(a_data)) + a_data
    b_data = np.array([1.0], dtype="<f4").tobytes()
    expected += struct.pack(">I", 1) + b"b" + struct.pack(">I", 3) + b"<f4" + struct.pack(">IQ", 1, 1)
    expected += struct.pack(">Q", len(b_data)) + b_data
    assert canonical_bytes(arrays) == expected
    assert arrays_sha256(arrays) == hashlib.sha256(expected).hexdigest()


def test_hash_ignores_insertion_order_and_byte_order_but_not_values_shapes_or_dtypes() -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    base = arrays_sha256({"w": w, "b": b})
    assert arrays_sha256({"b": b, "w": w}) == base
    assert arrays_sha256({"w": w.astype(">f4"), "b": b}) == base
    assert arrays_sha256({"w": np.asfortranarray(w), "b": b}) == base
    flipped = w.copy()
    flipped.view(np.uint32)[0, 0] ^= 1
    assert arrays_sha256({"w": flipped, "b": b}) != base
    assert arrays_sha256({"w": w.reshape(3, 4), "b": b}) != base
    assert arrays_sha256({"w": w.astype(np.float64), "b": b}) != base
    assert arrays_sha256({"w2": w, "b": b}) != base


def test_hash_rejects_non_numeric_arrays() -> None:
    with pytest.raises(MalformedError):
        arrays_sha256({"x": np.array(["a"], dtype=object)})
    with pytest.raises(MalformedError):
        arrays_sha256({"": np.zeros(1)})


def test_window_file_round_trip_and_checks(tmp_path: Path) -> None:
    spec = get_task("plaid-appliance", 1)
    x = np.random.default_rng(0).standard_normal((5, 1, 128)).astype(np.float32)
    y = np.arange(5, dtype=np.int64)
    path = tmp_path / "w.npz"
    save_window_file(path, WindowSet(x, y, window_fingerprint(x, y)))
    loaded = load_window_file(path, spec)
    assert np.array_equal(loaded.x, x) and loaded.y is not None and np.array_equal(loaded.y, y)
    assert loaded.fingerprint == window_fingerprint(x, y)
    with pytest.raises(MalformedError):
        load_window_file(path, get_task("env-forecast", 1))  # wrong window shape for that task
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    save_window_file(path, WindowSet(bad, y, "f"))
    with pytest.raises(MalformedError):
        load_window_file(path, spec)
    np.savez(tmp_path / "pickled.npz", x=np.array([object()], dtype=object))
    with pytest.raises(MalformedError):
        load_window_file(tmp_path / "pickled.npz", spec)
