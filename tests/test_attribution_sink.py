"""The strategy's attribution hook, fed RoundCaptures of real PLAID training as UpdateCapture produces them."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.attribution import (
    RoundUpdates,
    RoundValuation,
    ScreenReason,
    ValuationMethod,
    ValuationSettings,
    value_round,
)
from coordinator.attribution.round_sink import AttributionSink
from coordinator.attribution.task_loss import TaskValidationLoss
from coordinator.capture.round import CapturedUpdate, RoundCapture
from coordinator.federation.job import JobOutcome, NodeHistory
from coordinator.federation.server_app import record_attribution
from edge.sensors.plaid import load_plaid
from protocol.tasks.arrays import arrays_sha256
from protocol.tasks.models import build_model, load_arrays, model_arrays, train_epochs
from protocol.tasks.spec import PLAID_APPLIANCE as SPEC


class Recorder:
    def __init__(self) -> None:
        self.rounds: list[int] = []

    def on_round(self, capture: RoundCapture) -> None:
        self.rounds.append(capture.round)


Data = tuple[TaskValidationLoss, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def data() -> Data:
    train = load_plaid("train", length=SPEC.window_length)
    test = load_plaid("test", length=SPEC.window_length)
    return TaskValidationLoss(SPEC, build_model(SPEC, 0), test.X[:, None, :], test.y), train.X[:, None, :], train.y


def trained(
    global_arrays: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, rnd: int, lr: float = 3e-3
) -> dict[str, np.ndarray]:
    model = build_model(SPEC, 0)
    load_arrays(model, global_arrays)
    train_epochs(SPEC, model, x, y, epochs=1, batch_size=16, lr=lr, seed=rnd)
    return model_arrays(model)


def capture(rnd: int, global_arrays: dict[str, np.ndarray], replies: dict[int, dict[str, np.ndarray]]) -> RoundCapture:
    global_sha = arrays_sha256(global_arrays)
    updates = tuple(
        CapturedUpdate(rnd, node, arrays, arrays_sha256(arrays), global_sha, 100, 100, {})
        for node, arrays in replies.items()
    )
    return RoundCapture(run_id=1, round=rnd, global_sha256=global_sha, updates=updates, drops=())


def test_sink_values_captured_rounds_and_passes_them_on(
    data: tuple[TaskValidationLoss, np.ndarray, np.ndarray],
) -> None:
    val, x, y = data
    parts = np.array_split(np.random.default_rng(0).permutation(len(y))[:360], 3)
    recorder = Recorder()
    sink = AttributionSink(val, ValuationSettings(), member_of=lambda node: f"member-{node}", then=recorder)
    global_arrays = model_arrays(build_model(SPEC, 0))
    sink.observe_global(global_arrays)
    for rnd in (1, 2):
        replies = {10 + i: trained(global_arrays, x[p], y[p], rnd) for i, p in enumerate(parts)}
        replies[99] = {k: v.copy() for k, v in global_arrays.items()}  # sends the global model back
        sink.on_round(capture(rnd, global_arrays, replies))
        honest = [val.flatten(replies[10 + i]) for i in range(3)]
        global_arrays = val.unflatten(np.mean(honest, axis=0).astype(np.float32))
        sink.observe_global(global_arrays)

    assert recorder.rounds == [1, 2]
    assert sink.skipped == []
    assert [v.method for v in sink.valuations] == [ValuationMethod.EXACT, ValuationMethod.EXACT]
    for valuation in sink.valuations:
        assert {f.reason for f in valuation.flags["member-99"]} == {ScreenReason.ZERO_UPDATE}
    assert sink.account.totals["member-99"] == 0.0
    assert all(sink.account.totals[f"member-{10 + i}"] > 0 for i in range(3))
    assert sink.reputation.score_milli("member-10") > sink.reputation.score_milli("member-99")

    # What the ServerApp leaves in outcome.json for `serve` to log and settle by: the account, and each round.
    outcome = JobOutcome(run_id=1, status="finished")
    record_attribution(outcome, sink)
    assert outcome.attribution == sink.account.attribution_vector()
    assert outcome.attribution_history["member-99"] == NodeHistory(rounds=2, excluded_rounds=2, screens=["zero_update"])
    assert outcome.attribution_history["member-10"] == NodeHistory(rounds=2, excluded_rounds=0, screens=[])
    for rnd in (1, 2):
        valued = outcome.attribution_rounds[rnd]
        assert (valued.method, valued.excluded, valued.screens) == (
            "exact",
            ["member-99"],
            {"member-99": ["zero_update"]},
        )
        assert valued.values["member-99"] == 0 and all(valued.values[f"member-{10 + i}"] > 0 for i in range(3))
    assert sum(sum(v.values.values()) for v in outcome.attribution_rounds.values()) == pytest.approx(
        sum(outcome.attribution.values()), abs=8
    )


def test_a_far_longer_update_is_valued_and_handed_to_aggregation_clipped(data: Data) -> None:
    val, x, y = data
    parts = np.array_split(np.random.default_rng(1).permutation(len(y))[:480], 4)
    sink = AttributionSink(val, ValuationSettings(), member_of=lambda node: f"member-{node}")
    global_arrays = model_arrays(build_model(SPEC, 0))
    sink.observe_global(global_arrays)
    # Small steps (a tenth of the usual rate): fifteen of them still point where the global model does, where the
    # first step at the usual rate is a fifth of the model and fifteen of it a model unrelated to it (random weights).
    replies = {10 + i: trained(global_arrays, x[p], y[p], 1, lr=3e-4) for i, p in enumerate(parts)}
    start = val.flatten(global_arrays)
    boosted = start + 15 * (val.flatten(replies[13]) - start)  # node 13's own step, fifteen times as long
    replies[13] = val.unflatten(boosted.astype(np.float32))
    sink.on_round(capture(1, global_arrays, replies))

    (valuation,) = sink.valuations
    assert ScreenReason.NORM_OUTLIER in {f.reason for f in valuation.flags["member-13"]}
    factor = sink.clip_factors(1)[13]
    assert set(sink.clip_factors(1)) == {13} and valuation.clipped == {"member-13": factor}
    norms = [float(np.linalg.norm(val.flatten(replies[10 + i]) - start)) for i in range(4)]
    assert factor * norms[3] == pytest.approx(10 * float(np.median(norms[:3])), rel=1e-4)
    assert 13 not in sink.excluded_nodes(1) and sink.member_weights(1)[13] > 0
    assert sink.clip_factors(2) == {}


def test_one_members_nodes_are_valued_as_one_player_and_handed_to_aggregation_as_their_sum(data: Data) -> None:
    val, x, y = data
    # Recordings split by label: four devices holding different appliances, so no two are alike by their data.
    parts = [part[:120] for part in np.array_split(np.argsort(y, kind="stable"), 4)]
    owners = {10: "ann", 11: "bob", 12: "cid", 13: "cid"}  # cid's data is on two devices
    sink = AttributionSink(
        val, ValuationSettings(), member_of=lambda node: f"member-{node}", owner_of=lambda node: owners[node]
    )
    global_arrays = model_arrays(build_model(SPEC, 0))
    sink.observe_global(global_arrays)
    replies = {10 + i: trained(global_arrays, x[p], y[p], 1) for i, p in enumerate(parts)}
    sink.on_round(capture(1, global_arrays, replies))

    (valuation,) = sink.valuations
    assert ("member-12", "member-13") in valuation.players and len(valuation.players) == 3
    assert ScreenReason.SAME_MEMBER in {f.reason for f in valuation.flags["member-13"]}
    weights, combined = sink.member_weights(1), sink.combine_factors(1)
    # One member's weight between them (in halves, or by their shares when the screens find them alike too).
    assert weights[12] + weights[13] == pytest.approx(weights[10]) and weights[12] > 0 and weights[13] > 0
    assert set(combined) == {12, 13} and combined[12] == combined[13] and 0 < combined[12] <= 2


def test_unknown_global_or_malformed_reply_is_skipped_not_raised(data: Data) -> None:
    val, _, _ = data
    recorder = Recorder()
    sink = AttributionSink(val, ValuationSettings(), then=recorder)
    global_arrays = model_arrays(build_model(SPEC, 0))
    other = model_arrays(build_model(SPEC, 1))
    sink.on_round(capture(1, global_arrays, {1: other, 2: other}))
    assert [s.round for s in sink.skipped] == [1]
    assert "not observed" in sink.skipped[0].reason

    sink.observe_global(global_arrays)
    bad = {k: v for k, v in other.items() if k != "head.bias"}
    sink.on_round(capture(2, global_arrays, {1: bad}))
    assert [s.round for s in sink.skipped] == [1, 2]
    assert "malformed" in sink.skipped[1].reason
    assert recorder.rounds == [1, 2]
    assert sink.valuations == []


def test_sink_hands_each_round_the_members_previous_updates_and_groups(
    data: tuple[TaskValidationLoss, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.attribution.round_sink as round_sink

    seen: list[RoundUpdates] = []

    def spy(updates: RoundUpdates, *args: object, **kwargs: object) -> RoundValuation:
        seen.append(updates)
        return value_round(updates, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(round_sink, "value_round", spy)
    val, x, y = data
    parts = np.array_split(np.random.default_rng(1).permutation(len(y))[:480], 4)
    sink = AttributionSink(val, ValuationSettings(), member_of=lambda node: f"member-{node}")
    global_arrays = model_arrays(build_model(SPEC, 0))
    sink.observe_global(global_arrays)
    for rnd in (1, 2):
        replies = {10 + i: trained(global_arrays, x[p], y[p], rnd) for i, p in enumerate(parts)}
        replies[20] = {k: v.copy() for k, v in replies[10].items()}  # a copy of node 10's model: one player with it
        sink.on_round(capture(rnd, global_arrays, replies))
        global_arrays = val.unflatten(np.mean([val.flatten(replies[10 + i]) for i in range(4)], axis=0))
        sink.observe_global(global_arrays)

    first, second = seen
    assert first.previous_updates == [None] * 5 and list(first.previous_groups) == []
    assert second.previous_updates is not None
    for member, previous in zip(second.members, second.previous_updates, strict=True):
        assert previous is not None
        np.testing.assert_array_equal(previous, first.updates[list(first.members).index(member)])
    assert [tuple(g) for g in second.previous_groups] == [("member-10", "member-20")]
    # The job's account judges same data over the rounds with the job's screens settings: the copy is a job group.
    assert sink.account.screen_settings == sink.settings.screens
    assert sink.account.job_pairs() == [("member-10", "member-20")]
