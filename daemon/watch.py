"""The regression watch: is the newly promoted adapter worse in production than the one before?

A pure decision over two windows of production feedback (:mod:`feedback.production`): the
active adapter's and its predecessor's. For each signal, agents' **edit rate** and users'
**thumbs-down rate**, it tests one-sided whether the active adapter's rate exceeds the
predecessor's by more than the configured margin:

    H0: p_active − p_previous ≤ margin        H1: p_active − p_previous > margin

with the Agresti–Caffo adjusted two-proportion z statistic (one success and one failure added
to each window, so an all-zero or all-one window still has a variance)

    p̃ = (x + 1) / (n + 2)
    z = (p̃_a − p̃_p − margin) / √(p̃_a(1 − p̃_a)/(n_a + 2) + p̃_p(1 − p̃_p)/(n_p + 2))

and p = 1 − Φ(z). A signal is tested only when both windows hold ``min_events`` of its events;
with two signals tested, each is held to ``alpha / 2`` (Bonferroni), so the chance of a false
alarm per judgement stays within ``alpha``. The adapter has regressed when any tested signal
rejects H0. The daemon (:class:`daemon.regression.RegressionWatch`) gathers the windows, exports
them, and acts on a regression per ``watch.action``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from feedback.base import FrozenModel
from feedback.production import AdapterFeedback


class WatchConfig(FrozenModel):
    enabled: bool = Field(True, description="judge each promoted adapter's production feedback")
    action: Literal["rollback", "alert"] = Field(
        "rollback",
        description="on a regression: roll back to the predecessor (and reject the adapter), "
        "or only raise alignd_watch_regressed",
    )
    interval_s: float = Field(300.0, gt=0, description="how often the watch judges")
    window_hours: float = Field(
        72.0, gt=0, description="sliding window of production feedback per adapter"
    )
    max_events: int = Field(5000, gt=0, description="newest events per adapter and window")
    min_events: int = Field(
        200, gt=0, description="events a signal needs in both windows before it is tested"
    )
    edit_rate_margin: float = Field(
        0.05, ge=0, le=1, description="edit rate worse by more than this is a regression"
    )
    thumbs_down_margin: float = Field(
        0.05, ge=0, le=1, description="thumbs-down rate worse by more than this is a regression"
    )
    alpha: float = Field(
        0.01, gt=0, lt=1, description="false-alarm rate per judgement (split over the signals)"
    )
    watch_hours: float = Field(
        168.0, gt=0, description="stop judging an adapter this long after its promotion"
    )


@dataclass(frozen=True)
class SignalTest:
    signal: str  # "edit_rate" | "thumbs_down_rate"
    active: float
    previous: float
    n_active: int
    n_previous: int
    margin: float
    p_value: float
    alpha: float

    @property
    def regressed(self) -> bool:
        return self.p_value < self.alpha

    def describe(self) -> str:
        name = self.signal.replace("_", " ")
        return (
            f"{name} {self.active:.2f} vs {self.previous:.2f} (margin {self.margin:.2f}), "
            f"n = {self.n_active:,} vs {self.n_previous:,}, p = {self.p_value:.2g}"
        )


@dataclass(frozen=True)
class Verdict:
    status: Literal["waiting", "ok", "regressed"]
    reason: str
    tests: tuple[SignalTest, ...] = ()

    @property
    def regressed(self) -> bool:
        return self.status == "regressed"


def p_worse(x_a: int, n_a: int, x_p: int, n_p: int, margin: float) -> float:
    """One-sided p-value of H0 ``rate_a − rate_p ≤ margin`` (Agresti–Caffo adjusted z)."""
    pa, pp = (x_a + 1) / (n_a + 2), (x_p + 1) / (n_p + 2)
    se = math.sqrt(pa * (1 - pa) / (n_a + 2) + pp * (1 - pp) / (n_p + 2))
    z = (pa - pp - margin) / se
    return 0.5 * math.erfc(z / math.sqrt(2))


def judge(active: AdapterFeedback, previous: AdapterFeedback, config: WatchConfig) -> Verdict:
    """Compare the active adapter's window with its predecessor's (see the module doc)."""
    signals = (
        ("edit_rate", active.edited, active.handled, previous.edited, previous.handled,
         config.edit_rate_margin),
        ("thumbs_down_rate", active.down, active.rated, previous.down, previous.rated,
         config.thumbs_down_margin),
    )  # fmt: skip
    testable = [s for s in signals if min(s[2], s[4]) >= config.min_events]
    if not testable:
        counts = ", ".join(
            f"{name.replace('_', ' ')}: {n_a:,} vs {n_p:,}" for name, _, n_a, _, n_p, _ in signals
        )
        return Verdict(
            "waiting", f"too few events (need {config.min_events:,} in both windows; {counts})"
        )
    alpha = config.alpha / len(testable)
    tests = tuple(
        SignalTest(
            name, x_a / n_a, x_p / n_p, n_a, n_p, margin, p_worse(x_a, n_a, x_p, n_p, margin), alpha
        )
        for name, x_a, n_a, x_p, n_p, margin in testable
    )
    worse = [t for t in tests if t.regressed]
    if worse:
        return Verdict("regressed", "; ".join(t.describe() for t in worse), tests)
    return Verdict("ok", "; ".join(t.describe() for t in tests), tests)
