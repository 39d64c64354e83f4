"""Thousands of random and mutated envelopes into the ingest pipeline: nothing escapes as an exception, every one is
rejected (or recognised as a resend of a logged report), and the ledger does not change."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ingest_pipeline import Fixture, topic

from coordinator.ingest.pipeline import InboundMessage, Outcome
from protocol.topics import UpKind


def _mutations(valid: list[bytes]) -> st.SearchStrategy[bytes]:
    base = st.sampled_from(valid)

    def flip(data: bytes, pos: int, bit: int) -> bytes:
        i = pos % len(data)
        return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]

    def field_swap(data: bytes, name: str, value: object) -> bytes:
        doc = json.loads(data)
        if name.startswith("sig."):
            doc["signatures"][0][name[4:]] = value
        else:
            doc[name] = value
        return json.dumps(doc).encode()

    def body_edit(data: bytes, key: str, value: object) -> bytes:
        doc = json.loads(data)
        body = json.loads(base64.b64decode(doc["payload"]))
        body[key] = value
        doc["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
        return json.dumps(doc).encode()

    json_values = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.lists(st.integers()))
    return st.one_of(
        st.binary(max_size=600),
        st.builds(flip, base, st.integers(0, 10_000), st.integers(0, 7)),
        st.builds(lambda d, n: d[: n % len(d)], base, st.integers(0, 10_000)),
        st.builds(lambda d, junk: d + junk, base, st.binary(min_size=1, max_size=20)),
        st.builds(
            field_swap,
            base,
            st.sampled_from(["payloadType", "payload", "signatures", "sig.keyid", "sig.sig", "extra"]),
            json_values,
        ),
        st.builds(
            body_edit, base, st.sampled_from(["seq", "run_id", "examples", "loss_after", "v", "new"]), json_values
        ),
        # Re-encoded but semantically identical envelopes: same (key, seq), different bytes.
        st.builds(lambda d: json.dumps(json.loads(d), indent=1).encode(), base),
    )


def test_random_and_mutated_envelopes_never_crash_or_change_the_ledger(tmp_path: Path) -> None:
    fx = Fixture(tmp_path, burst=1_000_000)
    valid = [fx.report("dev-a", seq) for seq in range(1, 6)] + [fx.report("dev-b", seq) for seq in range(1, 6)]
    for envelope, device in zip(valid, ["dev-a"] * 5 + ["dev-b"] * 5, strict=True):
        assert fx.one(topic(device), envelope).outcome is Outcome.ACCEPTED
    size = fx.ledger.size
    root = fx.ledger.root()
    topics = st.sampled_from(
        [topic("dev-a"), topic("dev-b"), topic("dev-a", UpKind.HEARTBEAT), "mid/riverside/dev/dev-a/up/nope", ""]
    )
    seen = {"messages": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(st.tuples(topics, _mutations(valid)), min_size=1, max_size=12))
    def feed(batch: list[tuple[str, bytes]]) -> None:
        messages = [InboundMessage(t, p) for t, p in batch]
        screened = fx.pipeline.screen(messages, 1_790_000_000_000)
        committed = fx.pipeline.commit(screened.candidates, 1_790_000_000_000)
        assert committed == [], [v.message for v in committed]
        for verdict in screened.settled:
            assert verdict.outcome in (Outcome.REJECTED, Outcome.DUPLICATE), verdict
            assert verdict.reason is not None
        seen["messages"] += len(messages)

    feed()
    assert seen["messages"] >= 1000
    assert (fx.ledger.size, fx.ledger.root()) == (size, root)
