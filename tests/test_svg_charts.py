"""The inline SVG charts (protocol/svg_charts.py): well-formed XML with a title and description, values placed where
the scale puts them, every series drawn and named, text escaped, tables with headers."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from protocol.svg_charts import AXIS, PALETTE, TEXT, Series, bar_chart, data_table, line_chart, nice_ticks, page

SVG = "{http://www.w3.org/2000/svg}"


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


@pytest.mark.parametrize(
    ("low", "high", "first", "last"),
    [(0.0, 1.0, 0.0, 1.0), (0.31, 0.83, 0.2, 1.0), (-120.0, 480.0, -200.0, 600.0), (5.0, 5.0, 2.0, 8.0)],
)
def test_ticks_are_round_numbers_that_cover_the_range(low: float, high: float, first: float, last: float) -> None:
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    assert (ticks[0], ticks[-1]) == pytest.approx((first, last))
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1


def test_ticks_refuse_a_reversed_or_infinite_range() -> None:
    with pytest.raises(ValueError):
        nice_ticks(2.0, 1.0)
    with pytest.raises(ValueError):
        nice_ticks(0.0, float("inf"))


def test_a_line_chart_is_an_accessible_svg_with_one_marker_per_point_on_the_scale() -> None:
    svg = line_chart(
        "Accuracy <per> round",
        [Series("federated", ((1, 0.5), (2, 0.75), (3, 1.0))), Series("central", ((1, 0.9), (3, 0.9)))],
        x_label="round",
        y_label="accuracy",
        desc="what & why",
        chart_id="acc",
        y_floor=0.0,
        y_ceiling=1.0,
    )
    root = _parse(svg)
    assert root.get("role") == "img" and root.get("aria-labelledby") == "acc-title acc-desc"
    assert root.find(f"{SVG}title").text == "Accuracy <per> round"  # type: ignore[union-attr]
    assert root.find(f"{SVG}desc").text == "what & why"  # type: ignore[union-attr]
    groups = root.findall(f"{SVG}g")
    assert [g.get("data-series") for g in groups] == ["federated", "central"]
    circles = groups[0].findall(f"{SVG}circle")
    assert len(circles) == 3
    ys = [float(c.get("cy")) for c in circles]  # type: ignore[arg-type]
    # y grows downwards; 0.5 is half-way between the plot's 0 and 1 lines: equal steps for equal values.
    assert ys[0] > ys[1] > ys[2]
    assert ys[0] - ys[1] == pytest.approx(ys[1] - ys[2], abs=0.2)
    assert groups[0].find(f"{SVG}polyline").get("stroke") == PALETTE[0]  # type: ignore[union-attr]
    assert groups[1].find(f"{SVG}polyline").get("stroke") == PALETTE[1]  # type: ignore[union-attr]


def test_a_bar_chart_hangs_negative_values_below_the_zero_line() -> None:
    svg = bar_chart(
        "Value",
        ["1", "2"],
        [Series("ann", values=(2.0, -1.0)), Series("bob", values=(1.0, float("nan")))],
        x_label="round",
        y_label="loss drop",
        desc="d",
        chart_id="v",
    )
    bars = {(b.get("data-series"), b.get("data-category")): b for b in _parse(svg).iter(f"{SVG}rect")
            if b.get("class") == "bar"}  # fmt: skip
    assert set(bars) == {("ann", "1"), ("ann", "2"), ("bob", "1")}  # NaN: not valued, no bar
    height = {k: float(b.get("height")) for k, b in bars.items()}  # type: ignore[arg-type]
    assert height[("ann", "1")] == pytest.approx(2 * height[("bob", "1")], rel=0.01)
    top = {k: float(b.get("y")) for k, b in bars.items()}  # type: ignore[arg-type]
    # ann's round-2 bar starts at the zero line, where the positive bars end.
    assert top[("ann", "2")] == pytest.approx(top[("bob", "1")] + height[("bob", "1")], abs=0.2)


def test_a_bar_chart_refuses_a_series_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="2 values for 3 categories"):
        bar_chart("t", ["a", "b", "c"], [Series("s", values=(1, 2))], x_label="", y_label="", desc="", chart_id="x")


def test_an_empty_chart_says_so() -> None:
    svg = line_chart("t", [Series("s")], x_label="x", y_label="y", desc="d", chart_id="e")
    assert "no data" in svg
    _parse(svg)


def test_tables_and_pages_escape_what_they_show() -> None:
    table = data_table("<caption>", ["a", "b"], [["<script>", 1]])
    assert "<script>" not in table and "&lt;script&gt;" in table
    assert '<th scope="row">&lt;script&gt;</th><td class="num">1</td>' in table
    html = page("t & u", table)
    assert html.startswith("<!DOCTYPE html>") and '<html lang="en">' in html and "<title>t &amp; u</title>" in html
    assert "<script" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")


def _luminance(colour: str) -> float:
    def channel(c: int) -> float:
        s = c / 255
        return s / 12.92 if s <= 0.03928 else ((s + 0.055) / 1.055) ** 2.4

    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


@pytest.mark.parametrize("colour", [*PALETTE, TEXT, AXIS])
def test_every_colour_reaches_wcag_aa_contrast_against_the_white_background(colour: str) -> None:
    ratio = (1.0 + 0.05) / (_luminance(colour) + 0.05)
    assert ratio >= 4.5, f"{colour}: {ratio:.2f}:1"
