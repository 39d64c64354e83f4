"""Hostile input to the ledger's text formats: every rejection is a typed ProtocolError, never another exception."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.ledger.store import LedgerStore
from protocol.checkpoint import (
    AddCheckpointBody,
    parse_add_checkpoint_body,
    parse_checkpoint_text,
    parse_receipt,
    verify_receipt,
)
from protocol.errors import MalformedError, ProtocolError, TooLargeError
from protocol.identity import SignerKey
from protocol.leaves import decode_leaf
from protocol.witness import CosignatureVerifier, LogView

KEY = SignerKey.generate("mid.example/ledger")


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    path: Path = tmp_path_factory.mktemp("ledger") / "ledger.db"
    with LedgerStore.open(path, KEY) as store:
        store.append([b"a", b"b", b"c"])
        old = store.checkpoint()
        store.append([b"d", b"e"])
        return {
            "receipt": store.receipt(1).encode(),
            "body": AddCheckpointBody(3, tuple(store.consistency_proof(3)), store.checkpoint()).encode(),
            "old": old,
            "leaf": store.leaf(1),
        }


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        if out:
            out[position % len(out)] = value
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS, cut=st.integers(0, 2000))
def test_mutated_receipts_raise_only_typed_errors(
    samples: dict[str, bytes], edits: list[tuple[int, int]], cut: int
) -> None:
    original = verify_receipt(samples["receipt"], samples["leaf"], KEY.verifier)
    for data in (_mutate(samples["receipt"], edits), samples["receipt"][:cut]):
        try:
            accepted = verify_receipt(data, samples["leaf"], KEY.verifier)
        except ProtocolError:
            continue
        # Whatever still verifies states exactly what the original did.
        assert (accepted.index, accepted.checkpoint.checkpoint) == (original.index, original.checkpoint.checkpoint)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS, cut=st.integers(0, 2000))
def test_mutated_witness_bodies_raise_only_typed_errors(
    samples: dict[str, bytes], edits: list[tuple[int, int]], cut: int
) -> None:
    expected = LogView(KEY.verifier, samples["old"]).add_checkpoint(samples["body"]).checkpoint
    for data in (_mutate(samples["body"], edits), samples["body"][:cut]):
        view = LogView(KEY.verifier, samples["old"])
        try:
            accepted = view.add_checkpoint(data)
        except ProtocolError:
            assert view.note == samples["old"]  # a rejected body changes nothing
            continue
        assert accepted.checkpoint == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    """Parsers either return a value or raise a ProtocolError; any other exception fails the test."""
    for parse in (parse_receipt, parse_add_checkpoint_body, decode_leaf):
        with contextlib.suppress(ProtocolError):
            parse(data)
    for text_parse in (parse_checkpoint_text, CosignatureVerifier.parse):
        with contextlib.suppress(ProtocolError):
            text_parse(data.decode("utf-8", "replace"))


def test_size_limits_are_checked_before_parsing(samples: dict[str, bytes]) -> None:
    with pytest.raises(TooLargeError):
        parse_receipt(b"x" * (2 << 20))
    with pytest.raises(TooLargeError):
        parse_add_checkpoint_body(b"x" * (2 << 20))
    with pytest.raises(MalformedError):
        parse_add_checkpoint_body(samples["body"].replace(b"old 3\n", b"old 03\n"))
    with pytest.raises(MalformedError):
        parse_checkpoint_text("origin\n-1\nAAAA\n")
