"""The console's templates (``daemon/console/templates``, Jinja2 with autoescape on) and what
they draw from: line charts as coordinates, word-level differences, replies side by side.

Every value reaches the page through a template, so every value is escaped; nothing here builds
HTML by hand. The demo's report renders the views it shares with the console (the gate's
checks, replies side by side) through :func:`macro`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

CSS = (Path(__file__).parent / "console.css").read_text()  # the console's only style sheet


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table cell: floats to ``digits`` places, nothing as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def when(value: Any) -> str:
    """An ISO 8601 time as ``YYYY-MM-DD HH:MM:SS`` (UTC)."""
    return str(value or "")[:19].replace("T", " ")


CONSOLE_TEMPLATES = PackageLoader("daemon.console", "templates")
ENV = Environment(
    loader=CONSOLE_TEMPLATES,
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,  # a misspelt field fails the page (and its test), never blank
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters.update(fmt=fmt, when=when)
ENV.globals.update(css=Markup(CSS))


def render(template: str, **context: Any) -> str:
    return ENV.get_template(template).render(**context)


def macro(name: str, *args: Any) -> Markup:
    """One of ``macros.html``'s macros, rendered (for pages outside the console)."""
    rendered: Markup = getattr(ENV.get_template("macros.html").module, name)(*args)
    return rendered


# --- charts ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    name: str
    colour: str
    points: str  # "x,y x,y ..." in the chart's coordinates
    dot: tuple[float, float] | None  # a series of one point is drawn as a dot


@dataclass(frozen=True)
class Chart:
    """A small line chart in SVG coordinates: axes with min/max ticks, a legend."""

    label: str
    x_label: str
    lines: list[Line]
    ticks: dict[str, str] = field(default_factory=dict)  # y_max, y_min, x_min, x_max
    width: int = 560
    height: int = 236
    left: int = 52
    bottom: int = 34
    top: int = 28
    right: int = 12
    y_max_at: float = 0.0
    y_min_at: float = 0.0


COLOURS = ["#1f5fbf", "#b3261e", "#13743a", "#8a4fbf", "#c77700"]


def chart(series: dict[str, list[tuple[float, float]]], *, x_label: str, y_label: str) -> Chart:
    """One line per series; an empty chart (no points) renders as "nothing measured yet"."""
    c = Chart(label=y_label, x_label=x_label, lines=[])  # the frame: its size and margins
    points = [p for values in series.values() for p in values]
    if not points:
        return c
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return c.left + (x - x0) / (x1 - x0) * (c.width - c.left - c.right)

    def sy(y: float) -> float:
        return c.height - c.bottom - (y - y0) / (y1 - y0) * (c.height - c.bottom - c.top)

    lines = []
    for i, (name, values) in enumerate(series.items()):
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        dot = (round(sx(values[0][0]), 1), round(sy(values[0][1]), 1)) if len(values) == 1 else None
        lines.append(Line(name, COLOURS[i % len(COLOURS)], coords, dot))
    ticks = {"y_max": f"{y1:.3g}", "y_min": f"{y0:.3g}", "x_min": f"{x0:.4g}", "x_max": f"{x1:.4g}"}
    return replace(c, lines=lines, ticks=ticks, y_max_at=sy(y1), y_min_at=sy(y0))


# --- replies side by side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    text: str
    change: str = ""  # "" (both sides have it), "del" (only before), "ins" (only after)


def word_diff(before: str, after: str) -> tuple[list[Segment], list[Segment]]:
    """Both texts as segments, words only one side has marked (``del`` before, ``ins`` after)."""
    a, b = before.split(), after.split()
    left: list[Segment] = []
    right: list[Segment] = []
    for op, i1, i2, j1, j2 in SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = " ".join(a[i1:i2]), " ".join(b[j1:j2])
        if op == "equal":
            left.append(Segment(old))
            right.append(Segment(new))
            continue
        if old:
            left.append(Segment(old, "del"))
        if new:
            right.append(Segment(new, "ins"))
    return left, right


@dataclass(frozen=True)
class ReplyPair:
    """One held-out prompt: what the customer asked (and the record the assistant was given),
    the other model's reply and this one's, differences marked, unsupported specifics flagged."""

    customer: str
    before_name: str
    after_name: str
    before: list[Segment]
    after: list[Segment]
    before_flags: Sequence[str] = ()
    after_flags: Sequence[str] = ()
    record: str = ""


def reply_pair(customer: str, before: tuple[str, str, Sequence[str]],
               after: tuple[str, str, Sequence[str]], record: str = "") -> ReplyPair:  # fmt: skip
    """``before`` and ``after`` are (whose, reply, unsupported specifics)."""
    left, right = word_diff(before[1], after[1])
    return ReplyPair(customer, before[0], after[0], left, right, before[2], after[2], record)
