"""Property: the store's streaming window cutter gives exactly the windows of a plain list-based reference, for any
mix of good and failed samples, labels, segments and time gaps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.sensors.sample import ChannelSpec, Quality, Sample
from edge.sensors.store import SampleStore
from edge.sensors.windows import WindowSpec

row = st.tuples(
    st.integers(1, 3000),  # time step to the previous sample (ms)
    st.sampled_from([Quality.OK, Quality.OK, Quality.OK, Quality.ERROR, Quality.LATE]),
    st.sampled_from([None, 1, 2]),  # label
    st.sampled_from([None, 7]),  # segment
)


def reference(samples: list[Sample], length: int, stride: int, labelled: bool, max_gap: int) -> list[tuple[int, int]]:
    """(t_start, label) of every window: split into runs, then cut each run from its start."""
    runs: list[list[Sample]] = []
    current: list[Sample] = []
    previous: Sample | None = None
    for s in samples:
        bad = bool(s.quality & (Quality.ERROR | Quality.PARTIAL)) or math.isnan(s.values[0])
        breaks = previous is None or (s.label, s.segment) != (previous.label, previous.segment)
        breaks = breaks or s.t_ms - previous.t_ms > max_gap  # type: ignore[union-attr]
        if breaks or bad:
            runs.append(current)
            current = []
        if not bad:
            current.append(s)
        previous = s
    runs.append(current)
    out = []
    for run in runs:
        for start in range(0, len(run) - length + 1, stride):
            label = run[start].label
            if labelled and label is None:
                continue
            out.append((run[start].t_ms, -1 if label is None else label))
    return out


@pytest.mark.timeout(300)
@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(row, min_size=0, max_size=120),
    length=st.integers(1, 6),
    stride=st.integers(1, 4),
    labelled=st.booleans(),
    max_gap=st.sampled_from([1000, 2500, 10_000]),
)
def test_sliding_windows_match_the_reference(
    tmp_path_factory: pytest.TempPathFactory,
    rows: list[tuple[int, Quality, int | None, int | None]],
    length: int,
    stride: int,
    labelled: bool,
    max_gap: int,
) -> None:
    samples = []
    t = 0
    for k, (step, quality, label, segment) in enumerate(rows):
        t += step
        value = math.nan if quality & Quality.ERROR else float(k)
        samples.append(Sample("s", t, (value,), quality, label, segment))
    with SampleStore(tmp_path_factory.mktemp("prop") / "d.db") as store:
        store.register("s", (ChannelSpec("x", ""),))
        store.write(samples)
        windows = store.windows(WindowSpec("s", ("x",), length, stride=stride, labelled=labelled, max_gap_ms=max_gap))
    expected = reference(samples, length, stride, labelled, max_gap)
    assert list(zip(windows.t_start_ms.tolist(), windows.y.tolist(), strict=True)) == expected
    by_t = {s.t_ms: k for k, s in enumerate(samples)}
    for x, t0 in zip(windows.X, windows.t_start_ms, strict=True):
        first = by_t[int(t0)]
        np.testing.assert_array_equal(x[0], [s.values[0] for s in samples[first : first + length]])
