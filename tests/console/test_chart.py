"""The console's SVG bar chart: scaled to a round top, every bar with its tooltip, text escaped, nothing a
Content-Security-Policy of default-src 'self' would block (no script, no inline style)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from gateway.console.chart import HEIGHT, TOP, Bar, bar_chart, nice_top

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    ("value", "top"),
    [
        (0, 1.0),
        (-3, 1.0),
        (0.3, 0.5),
        (1, 1.0),
        (1.01, 2.0),
        (3, 5.0),
        (7.2, 10.0),
        (12, 20.0),
        (100, 100.0),
        (101, 200.0),
        (0.00042, 0.0005),
        (0.1, 0.1),
    ],
)
def test_the_axis_top_is_the_next_one_two_or_five(value, top):
    assert nice_top(value) == pytest.approx(top)


def parsed(markup: str) -> ET.Element:
    return ET.fromstring(markup)  # well-formed XML, or this raises


def rects(svg: ET.Element) -> list[ET.Element]:
    return svg.findall(f"{SVG}rect")


def test_bars_are_scaled_to_the_top_and_each_says_its_value():
    svg = parsed(bar_chart([Bar("2026-12-01", 1.0, "$1.00"), Bar("2026-12-02", 2.0, "$2.00")], "Spend"))
    first, second = rects(svg)
    plot_h = HEIGHT - TOP - 24
    assert float(second.get("height")) == pytest.approx(plot_h)  # 2.0 is the top
    assert float(first.get("height")) == pytest.approx(plot_h / 2)
    assert float(first.get("y")) + float(first.get("height")) == pytest.approx(TOP + plot_h)  # on the baseline
    assert float(first.get("x")) < float(second.get("x"))
    assert [r.find(f"{SVG}title").text for r in (first, second)] == ["2026-12-01: $1.00", "2026-12-02: $2.00"]
    labels = [t.text for t in svg.findall(f"{SVG}text")]
    assert "2026-12-01" in labels and "2026-12-02" in labels and "2" in labels


def test_the_axis_label_is_written_by_the_caller():
    svg = parsed(bar_chart([Bar("a", 3.0, "$3.00")], "Spend", axis=lambda top: f"${top:.2f}"))
    assert "$5.00" in [t.text for t in svg.findall(f"{SVG}text")]


def test_labels_and_titles_are_escaped():
    markup = bar_chart([Bar("<script>x</script>", 1.0, '"&')], 'A "title" & <more>')
    assert "<script>" not in markup
    svg = parsed(markup)
    assert svg.get("aria-label") == 'A "title" & <more>'
    assert rects(svg)[0].find(f"{SVG}title").text == '<script>x</script>: "&'


def test_no_bars_draws_an_empty_chart_that_says_so():
    svg = parsed(bar_chart([], "Spend"))
    assert rects(svg) == [] and "nothing yet" in [t.text for t in svg.findall(f"{SVG}text")]


def test_zero_and_negative_values_draw_no_height():
    svg = parsed(bar_chart([Bar("a", 0.0, "$0"), Bar("b", -1.0, "-$1")], "Spend"))
    assert [float(r.get("height")) for r in rects(svg)] == [0.0, 0.0]


def test_nothing_the_content_security_policy_would_block():
    markup = str(bar_chart([Bar(f"d{i}", float(i), f"${i}") for i in range(30)], "Spend"))
    assert not re.search(r"<script|style=|on[a-z]+=|javascript:|href=", markup)
    assert len(rects(parsed(markup))) == 30
