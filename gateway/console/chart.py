"""Charts drawn on the server as SVG: no script, no inline style (the console's Content-Security-Policy allows
neither), only shapes with classes that the console's stylesheet colours. Pure: figures in, markup out."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from markupsafe import Markup

WIDTH = 640
HEIGHT = 180
LEFT = 56  # room for the value axis' labels
BOTTOM = 24  # room for the first and last labels under the bars
TOP = 12
GAP = 0.2  # of each slot left empty between two bars


@dataclass(frozen=True, slots=True)
class Bar:
    label: str  # under the bar (the first and last are written), and in its tooltip
    value: float  # ≥ 0
    shown: str  # the value as the tooltip says it ("$1.20")


def nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 × 10^n at or above `value`: the value axis' top (1 for nothing at all)."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    return next(step * scale for step in (1, 2, 5, 10) if step * scale >= value * (1 - 1e-9))


def bar_chart(bars: Sequence[Bar], title: str, axis: Callable[[float], str] | None = None) -> Markup:
    """Bars side by side, scaled to the largest (the axis' top a round figure, written by `axis`), each with a
    tooltip; the whole scales to its container's width (viewBox)."""
    top = nice_top(max((bar.value for bar in bars), default=0.0))
    plot_w = WIDTH - LEFT
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label={quoteattr(title)} '
        'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
        _grid(plot_h, (axis or _number)(top)),
    ]
    slot = plot_w / max(len(bars), 1)
    for index, bar in enumerate(bars):
        height = plot_h * max(bar.value, 0.0) / top
        left = LEFT + index * slot + slot * GAP / 2
        top_edge = TOP + plot_h - height
        parts.append(
            f'<rect class="bar" x="{left:.1f}" y="{top_edge:.1f}" width="{slot * (1 - GAP):.1f}" height="{height:.1f}">'
            f"<title>{escape(bar.label)}: {escape(bar.shown)}</title></rect>"
        )
    if bars:
        parts.append(_axis_label(LEFT, bars[0].label, "start"))
        if len(bars) > 1:
            parts.append(_axis_label(WIDTH, bars[-1].label, "end"))
    else:
        middle = f'x="{LEFT + plot_w / 2:.0f}" y="{TOP + plot_h / 2:.0f}"'
        parts.append(f'<text class="axis" {middle} text-anchor="middle">nothing yet</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _grid(plot_h: float, top_label: str) -> str:
    base = TOP + plot_h
    return (
        f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{WIDTH}" y2="{TOP}"/>'
        f'<line class="grid" x1="{LEFT}" y1="{TOP + plot_h / 2:.1f}" x2="{WIDTH}" y2="{TOP + plot_h / 2:.1f}"/>'
        f'<line class="baseline" x1="{LEFT}" y1="{base:.1f}" x2="{WIDTH}" y2="{base:.1f}"/>'
        f'<text class="axis" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">{escape(top_label)}</text>'
        f'<text class="axis" x="{LEFT - 6}" y="{base:.1f}" text-anchor="end">0</text>'
    )


def _axis_label(at: float, text: str, anchor: str) -> str:
    return f'<text class="axis" x="{at:.0f}" y="{HEIGHT - 6}" text-anchor="{anchor}">{escape(text)}</text>'


def _number(value: float) -> str:
    return f"{value:g}"
