"""Charts as inline SVG, rendered on the server: the job report, the operator dashboard and the member page show
plots without any script or stylesheet from elsewhere (no network at runtime, nothing to pin or vendor).

Pure functions from numbers to markup. Every chart is an `<svg role="img">` with a `<title>` and a `<desc>` naming
what it shows, and is meant to sit beside a `data_table` of the same numbers (the text alternative screen readers and
tests read). Colours are the darker half of the Okabe-Ito palette (safe for colour-blind readers), each at least 4.5:1
against white; every series also has its own marker shape or dash so that colour is never the only cue.

It lives in `protocol/` because both sides draw charts: the coordinator's pages and the agent's member page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Okabe-Ito, darkened where needed to reach >= 4.5:1 against white (WCAG AA for text and graphics).
PALETTE = ("#0b5f99", "#a64b00", "#00735a", "#8e3f72", "#5b5b00", "#b3261e", "#3a3a8c", "#4d4d4d")
DASHES = ("", "6 3", "2 3", "8 3 2 3", "4 4", "1 2", "10 4", "3 6")
TEXT = "#1a1a1a"
GRID = "#d0d0d0"
AXIS = "#333333"


def escape(text: object) -> str:
    """Text made safe for HTML and SVG element content and attribute values."""
    return html.escape(str(text), quote=True)


@dataclass(frozen=True)
class Series:
    """One named run of values: `points` (x, y) for a line chart, or `values` by category for a bar chart."""

    name: str
    points: tuple[tuple[float, float], ...] = ()
    values: tuple[float, ...] = ()


@dataclass(frozen=True)
class Frame:
    """The plot area inside an SVG of `width` x `height`."""

    width: int = 640
    height: int = 300
    left: int = 64
    right: int = 16
    top: int = 36
    bottom: int = 56

    @property
    def inner_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def inner_h(self) -> int:
        return self.height - self.top - self.bottom


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high] (1, 2, 2.5 or 5 times a power of ten apart).
    Requires finite low <= high."""
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"need finite low <= high, got {low!r}, {high!r}")
    if low == high:
        low, high = (low - 1, high + 1) if low == 0 else (low - abs(low) / 2, high + abs(high) / 2)
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.999:
        ticks.append(round(value, 12))
        value += step
    return ticks


def format_number(value: float) -> str:
    """A tick label: integers without a decimal point, others with at most 3 significant decimals."""
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) >= 1000 else f"{value:.3g}"


def _scale(value: float, low: float, high: float, start: float, length: float) -> float:
    return start + (value - low) / (high - low) * length


def _open(frame: Frame, title: str, desc: str, chart_id: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{frame.width}" height="{frame.height}"'
        f' viewBox="0 0 {frame.width} {frame.height}" aria-labelledby="{chart_id}-title {chart_id}-desc"'
        f' font-family="sans-serif" font-size="12">',
        f'<title id="{chart_id}-title">{escape(title)}</title>',
        f'<desc id="{chart_id}-desc">{escape(desc)}</desc>',
        f'<rect x="0" y="0" width="{frame.width}" height="{frame.height}" fill="#ffffff"/>',
        f'<text x="{frame.left}" y="20" fill="{TEXT}" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]


def _y_axis(frame: Frame, ticks: list[float], label: str) -> list[str]:
    low, high = ticks[0], ticks[-1]
    out = []
    for tick in ticks:
        y = _scale(tick, low, high, frame.top + frame.inner_h, -frame.inner_h)
        out.append(
            f'<line x1="{frame.left}" x2="{frame.left + frame.inner_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>'
        )
        out.append(
            f'<text x="{frame.left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{TEXT}">{format_number(tick)}</text>'
        )
    mid = frame.top + frame.inner_h / 2
    out.append(
        f'<text x="14" y="{mid:.1f}" transform="rotate(-90 14 {mid:.1f})" text-anchor="middle"'
        f' fill="{TEXT}">{escape(label)}</text>'
    )
    bottom = frame.top + frame.inner_h
    out.append(f'<line x1="{frame.left}" x2="{frame.left}" y1="{frame.top}" y2="{bottom}" stroke="{AXIS}"/>')
    return out


def _x_label(frame: Frame, label: str) -> str:
    x = frame.left + frame.inner_w / 2
    y = frame.top + frame.inner_h + 34
    return f'<text x="{x:.1f}" y="{y}" text-anchor="middle" fill="{TEXT}">{escape(label)}</text>'


LEGEND_COLUMNS = 2
LEGEND_ROW = 16


def _legend_height(count: int) -> int:
    return LEGEND_ROW * ((count + LEGEND_COLUMNS - 1) // LEGEND_COLUMNS)


def _legend(frame: Frame, names: Sequence[str], kind: str) -> list[str]:
    """Legend entries under the x axis's label, LEGEND_COLUMNS a row."""
    out = []
    for i, name in enumerate(names):
        row, col = divmod(i, LEGEND_COLUMNS)
        x = frame.left + col * (frame.inner_w / LEGEND_COLUMNS)
        y = frame.top + frame.inner_h + 52 + row * LEGEND_ROW
        colour = PALETTE[i % len(PALETTE)]
        if kind == "line":
            dash = DASHES[i % len(DASHES)]
            dashed = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(
                f'<line x1="{x:.1f}" x2="{x + 18:.1f}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}"'
                f' stroke-width="2.5"{dashed}/>'
            )
        else:
            out.append(f'<rect x="{x:.1f}" y="{y - 10}" width="12" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 22:.1f}" y="{y}" fill="{TEXT}">{escape(name)}</text>')
    return out


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    desc: str,
    chart_id: str,
    y_floor: float | None = None,
    y_ceiling: float | None = None,
    frame: Frame | None = None,
) -> str:
    """Lines through each series' points, markers on each point; `y_floor`/`y_ceiling` widen (never narrow) the y
    range, e.g. 0..1 for an accuracy. With no points at all, a chart that says so."""
    frame = frame or Frame(bottom=48 + _legend_height(len(series)))
    out = _open(frame, title, desc, chart_id)
    points = [p for s in series for p in s.points if math.isfinite(p[0]) and math.isfinite(p[1])]
    if not points:
        out.append(_empty(frame))
        return "\n".join([*out, "</svg>"])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    y_low = min([*ys, *([y_floor] if y_floor is not None else [])])
    y_high = max([*ys, *([y_ceiling] if y_ceiling is not None else [])])
    y_ticks = nice_ticks(y_low, y_high)
    x_ticks = nice_ticks(min(xs), max(xs), count=min(8, max(2, len(set(xs)))))
    x_low, x_high = x_ticks[0], x_ticks[-1]
    out += _y_axis(frame, y_ticks, y_label)
    bottom = frame.top + frame.inner_h
    for tick in x_ticks:
        x = _scale(tick, x_low, x_high, frame.left, frame.inner_w)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="{AXIS}"/>')
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" fill="{TEXT}">{format_number(tick)}</text>'
        )
    out.append(
        f'<line x1="{frame.left}" x2="{frame.left + frame.inner_w}" y1="{bottom}" y2="{bottom}" stroke="{AXIS}"/>'
    )
    for i, s in enumerate(series):
        colour, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
        coords = [
            (
                _scale(x, x_low, x_high, frame.left, frame.inner_w),
                _scale(y, y_ticks[0], y_ticks[-1], bottom, -frame.inner_h),
            )
            for x, y in s.points
            if math.isfinite(x) and math.isfinite(y)
        ]
        if not coords:
            continue
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        out.append(f'<g class="series" data-series="{escape(s.name)}">')
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.5"{dashed}/>')
        if len(coords) <= 200:
            for (x, y), (px, py) in zip(coords, s.points, strict=False):
                out.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">'
                    f"<title>{escape(s.name)}: {format_number(px)}, {format_number(py)}</title></circle>"
                )
        out.append("</g>")
    out += _legend(frame, [s.name for s in series], "line")
    out.append(_x_label(frame, x_label))
    return "\n".join([*out, "</svg>"])


def bar_chart(
    title: str,
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    desc: str,
    chart_id: str,
    frame: Frame | None = None,
) -> str:
    """Grouped bars: one group per category, one bar per series (`values[i]` belongs to `categories[i]`). Negative
    values hang below the zero line, which is always drawn."""
    legend = len(series) if len(series) > 1 else 0
    frame = frame or Frame(bottom=48 + _legend_height(legend))
    out = _open(frame, title, desc, chart_id)
    for s in series:
        if len(s.values) != len(categories):
            raise ValueError(f"series {s.name!r} has {len(s.values)} values for {len(categories)} categories")
    values = [v for s in series for v in s.values if math.isfinite(v)]
    if not values or not categories:
        out.append(_empty(frame))
        return "\n".join([*out, "</svg>"])
    ticks = nice_ticks(min(0.0, *values), max(0.0, *values))
    out += _y_axis(frame, ticks, y_label)
    bottom = frame.top + frame.inner_h
    zero = _scale(0.0, ticks[0], ticks[-1], bottom, -frame.inner_h)
    group_w = frame.inner_w / len(categories)
    bar_w = max(1.0, group_w * 0.8 / max(len(series), 1))
    for c, category in enumerate(categories):
        gx = frame.left + c * group_w + group_w * 0.1
        if len(categories) <= 40 or c % math.ceil(len(categories) / 40) == 0:
            out.append(
                f'<text x="{frame.left + (c + 0.5) * group_w:.1f}" y="{bottom + 16}" text-anchor="middle"'
                f' fill="{TEXT}">{escape(category)}</text>'
            )
        for i, s in enumerate(series):
            value = s.values[c]
            if not math.isfinite(value):
                continue
            y = _scale(value, ticks[0], ticks[-1], bottom, -frame.inner_h)
            top, height = min(y, zero), abs(zero - y)
            out.append(
                f'<rect class="bar" x="{gx + i * bar_w:.1f}" y="{top:.1f}" width="{bar_w:.1f}" height="{height:.1f}"'
                f' fill="{PALETTE[i % len(PALETTE)]}" data-series="{escape(s.name)}"'
                f' data-category="{escape(category)}" data-value="{value!r}">'
                f"<title>{escape(s.name)}, {escape(category)}: {format_number(value)}</title></rect>"
            )
    out.append(f'<line x1="{frame.left}" x2="{frame.left + frame.inner_w}" y1="{zero:.1f}" y2="{zero:.1f}"'
               f' stroke="{AXIS}"/>')  # fmt: skip
    if len(series) > 1:
        out += _legend(frame, [s.name for s in series], "bar")
    out.append(_x_label(frame, x_label))
    return "\n".join([*out, "</svg>"])


def _empty(frame: Frame) -> str:
    return (
        f'<text x="{frame.width / 2:.1f}" y="{frame.top + frame.inner_h / 2:.1f}" text-anchor="middle"'
        f' fill="{TEXT}">no data</text>'
    )


def data_table(caption: str, header: Sequence[str], rows: Sequence[Sequence[object]], *, numeric_from: int = 1) -> str:
    """An HTML table with a caption and column headers (scope="col"); the first cell of each row is its header
    (scope="row"); cells from column `numeric_from` on are right-aligned."""
    out = ["<table>", f"<caption>{escape(caption)}</caption>", "<thead><tr>"]
    out += [f'<th scope="col">{escape(h)}</th>' for h in header]
    out.append("</tr></thead><tbody>")
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            if i == 0:
                cells.append(f'<th scope="row">{escape(cell)}</th>')
            else:
                align = ' class="num"' if i >= numeric_from else ""
                cells.append(f"<td{align}>{escape(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    if not rows:
        out.append(f'<tr><td colspan="{len(header)}">none</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


PAGE_CSS = """
body{font-family:system-ui,sans-serif;color:#1a1a1a;background:#ffffff;margin:0 auto;max-width:1100px;padding:1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5rem 0 1rem}caption{text-align:left;font-weight:bold;padding:.25rem 0}
th,td{border:1px solid #bbb;padding:.25rem .5rem;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
thead th{background:#eef1f5}a{color:#0b5f99}a:focus,button:focus,input:focus{outline:3px solid #a64b00}
nav a{margin-right:1rem}.muted{color:#4d4d4d}.figure{margin:1rem 0}.skip{position:absolute;left:-999px}
.skip:focus{left:1rem;background:#fff}label{display:block;margin:.5rem 0 .25rem}
input{font-size:1rem;padding:.3rem}button{font-size:1rem;padding:.3rem .8rem;margin-top:.5rem}
.error{color:#b3261e;font-weight:bold}
"""


def page(title: str, body: str, *, nav: str = "") -> str:
    """A complete HTML page: language, charset, viewport, title, one inline stylesheet, a skip link, `main`."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # An empty icon, so that no browser asks the server for /favicon.ico (a 404 in its console).
        '<link rel="icon" href="data:,">\n'
        f"<title>{escape(title)}</title>\n<style>{PAGE_CSS}</style>\n</head>\n<body>\n"
        '<a class="skip" href="#main">Skip to content</a>\n'
        + (f'<nav aria-label="Pages">{nav}</nav>\n' if nav else "")
        + f'<main id="main">\n{body}\n</main>\n</body>\n</html>\n'
    )
