"""HTML building blocks of the operator console (:mod:`daemon.console`): escaping, tables,
label/value lists, SVG line charts and word-level differences. Plain strings, no template
engine and no script: every page renders in any browser, nothing is fetched from elsewhere."""

from __future__ import annotations

import html
from collections.abc import Iterable
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

CSS = (Path(__file__).parent / "console.css").read_text()  # the console's only style sheet


PASS, FAIL = '<span class="pass">pass</span>', '<span class="fail">fail</span>'


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def table(headers: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """``rows`` hold HTML already escaped by the caller."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def facts(items: dict[str, str]) -> str:
    """Label/value pairs that wrap on narrow screens (values are HTML escaped by the caller)."""
    cells = "".join(f"<div><dt>{esc(k)}</dt><dd>{v}</dd></div>" for k, v in items.items())
    return f'<dl class="facts">{cells}</dl>'


def svg_lines(series: dict[str, list[tuple[float, float]]], *, x_label: str, y_label: str) -> str:
    """A small line chart: one polyline per series, axes with min/max ticks, a legend."""
    points = [p for values in series.values() for p in values]
    if not points:
        return '<p class="note">nothing measured yet</p>'
    w, h, left, bottom, top, right = 560, 236, 52, 34, 28, 12
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def sy(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - bottom - top)

    colours = ["#1f5fbf", "#b3261e", "#13743a", "#8a4fbf", "#c77700"]
    parts = [
        f'<svg viewBox="0 0 {w} {h}" width="100%" role="img" aria-label="{esc(y_label)}">',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#888"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#888"/>',
        f'<text x="{left - 4}" y="{sy(y1) + 4:.0f}" font-size="11" text-anchor="end">'
        f"{y1:.3g}</text>",
        f'<text x="{left - 4}" y="{sy(y0):.0f}" font-size="11" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{left}" y="{h - 18}" font-size="11">{x0:.4g}</text>',
        f'<text x="{w - right}" y="{h - 18}" font-size="11" text-anchor="end">{x1:.4g}</text>',
        f'<text x="{(w + left) / 2:.0f}" y="{h - 4}" font-size="11" text-anchor="middle">'
        f"{esc(x_label)}</text>",
    ]
    for i, (name, values) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        if len(values) == 1:
            x, y = values[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        else:
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'
            )
        parts.append(
            f'<text x="{left + 150 * i}" y="14" font-size="12" fill="{colour}">■ {esc(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def word_diff(before: str, after: str) -> tuple[str, str]:
    """Both texts as HTML, words only one side has marked (``<del>`` before, ``<ins>`` after)."""
    a, b = before.split(), after.split()
    left, right = [], []
    for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = esc(" ".join(a[i1:i2])), esc(" ".join(b[j1:j2]))
        if op == "equal":
            left.append(old)
            right.append(new)
        else:
            if old:
                left.append(f"<del>{old}</del>")
            if new:
                right.append(f"<ins>{new}</ins>")
    return " ".join(left), " ".join(right)


def state_badge(state: str) -> str:
    return f'<span class="state {esc(state)}">{esc(state)}</span>'


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def short(text: Any, n: int = 16) -> str:
    return esc(str(text or "")[:n])
