"""transparency-dev/merkle's public proof vectors: our verifier agrees with wantErr, our generator with the proofs.

The vectors' trees are built from transparency-dev's testonly.LeafInputs() (testonly/constants.go), listed below.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import vectors_dir
from memory_tree import MemoryTree

from protocol.errors import ProtocolError
from protocol.merkle import verify_consistency, verify_inclusion

pytestmark = pytest.mark.vectors

LEAF_INPUTS = [
    bytes.fromhex(h)
    for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
]

# transparency-dev rejects every consistency proof from size 0; C2SP tlog-witness, which the project follows, accepts
# an empty proof from size 0 (the empty tree is a prefix of every tree). These two vectors are exactly that case.
C2SP_ACCEPTS = {"size1-is-zero-and-does-not-equal-size2.json", "size1-is-zero-and-size2-is-not-zero.json"}


def _files(kind: str) -> list[Path]:
    return sorted((vectors_dir("merkle") / kind).rglob("*.json"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(p.parents[1])) for p in paths]


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _d(value: str) -> bytes:
    return base64.b64decode(value)


def _proof(vector: dict[str, Any]) -> list[bytes]:
    return [_d(p) for p in vector["proof"] or []]


def _inclusion_files() -> list[Path]:
    try:
        return _files("inclusion")
    except pytest.skip.Exception:
        return []


def _consistency_files() -> list[Path]:
    try:
        return _files("consistency")
    except pytest.skip.Exception:
        return []


def test_vectors_present() -> None:
    assert len(_files("inclusion")) > 50
    assert len(_files("consistency")) > 50


@pytest.mark.parametrize("path", _inclusion_files(), ids=_ids(_inclusion_files()))
def test_inclusion_vector(path: Path) -> None:
    v = _load(path)
    try:
        verify_inclusion(v["leafIdx"], v["treeSize"], _d(v["leafHash"]), _proof(v), _d(v["root"]))
    except ProtocolError:
        assert v["wantErr"], f"valid proof rejected: {v['desc']}"
    else:
        assert not v["wantErr"], f"invalid proof accepted: {v['desc']}"


@pytest.mark.parametrize("path", _consistency_files(), ids=_ids(_consistency_files()))
def test_consistency_vector(path: Path) -> None:
    v = _load(path)
    want_err = v["wantErr"] and path.name not in C2SP_ACCEPTS
    try:
        verify_consistency(v["size1"], v["size2"], _proof(v), _d(v["root1"]), _d(v["root2"]))
    except ProtocolError:
        assert want_err, f"valid proof rejected: {v['desc']}"
    else:
        assert not want_err, f"invalid proof accepted: {v['desc']}"


def test_c2sp_size_zero_files_exist() -> None:
    names = {p.name for p in _files("consistency")}
    assert names >= C2SP_ACCEPTS


@pytest.mark.parametrize("path", [p for p in _inclusion_files() if p.name == "happy-path.json"])
def test_generated_inclusion_proof_matches(path: Path) -> None:
    v = _load(path)
    tree = MemoryTree(LEAF_INPUTS[: v["treeSize"]])
    assert tree.root() == _d(v["root"])
    assert tree.levels[0][v["leafIdx"]] == _d(v["leafHash"])
    assert tree.inclusion_proof(v["leafIdx"], v["treeSize"]) == _proof(v)


@pytest.mark.parametrize("path", [p for p in _consistency_files() if p.name == "happy-path.json"])
def test_generated_consistency_proof_matches(path: Path) -> None:
    v = _load(path)
    tree = MemoryTree(LEAF_INPUTS[: v["size2"]])
    assert tree.root(v["size1"]) == _d(v["root1"])
    assert tree.root(v["size2"]) == _d(v["root2"])
    assert tree.consistency_proof(v["size1"], v["size2"]) == _proof(v)
