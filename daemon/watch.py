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

and p = 1 − Φ(z). The watch judges people, not events: each actor counts at most
``edits_per_actor`` / ``ratings_per_actor`` of their newest events per window (a user's rating
once, by default; :func:`feedback.production.summarize`), and a signal is tested only when both
windows hold ``min_events`` of its counted events from ``min_actors`` distinct actors. With two
signals tested, each is held to ``alpha / 2`` (Bonferroni), so the chance of a false alarm per
judgement stays within ``alpha``. The adapter has regressed when any tested signal rejects H0
and no single actor supplies more than the gate's ``max_actor_share`` of either window of that
signal; a regression only such an actor shows is reported ("refused") and not acted on. The
daemon (:class:`daemon.regression.RegressionWatch`) gathers the windows, exports
them, and acts on a regression per ``watch.action``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from pydantic import Field

from feedback.base import FrozenModel
from feedback.production import AdapterFeedback, PerActor


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
    edits_per_actor: int | None = Field(
        100, gt=0, description="an agent's newest edits counted per window (null: all)"
    )
    ratings_per_actor: int | None = Field(
        1, gt=0, description="a user's newest ratings counted per window: 1 = each person once"
    )
    min_actors: int = Field(
        5, gt=0, description="distinct actors a signal needs in both windows before it is tested"
    )
    feedback_lag_hours: float = Field(
        24.0,
        ge=0,
        description="feedback on a version's replies counts this long after it stopped serving",
    )
    clock_skew_s: float = Field(
        300.0, ge=0, description="feedback dated this much before a version served still counts"
    )

    def per_actor(self) -> PerActor:
        return PerActor(edits=self.edits_per_actor, ratings=self.ratings_per_actor)


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
    actors: tuple[int, int] = (0, 0)  # distinct actors counted: active, previous
    top_share: float = 0.0  # the largest single actor's share of either window

    @property
    def regressed(self) -> bool:
        return self.p_value < self.alpha

    def describe(self) -> str:
        name = self.signal.replace("_", " ")
        return (
            f"{name} {self.active:.2f} vs {self.previous:.2f} (margin {self.margin:.2f}), "
            f"n = {self.n_active:,} vs {self.n_previous:,} from {self.actors[0]:,} vs "
            f"{self.actors[1]:,} actors (largest share {self.top_share:.2f}), "
            f"p = {self.p_value:.2g}"
        )


@dataclass(frozen=True)
class Verdict:
    status: Literal["waiting", "ok", "regressed", "refused"]
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


class Signal(NamedTuple):
    """One proportion compared between two windows (the canary analysis tests its own)."""

    name: str
    x_a: int  # events of the kind watched (edited, thumbs down) in the active window
    n_a: int  # events counted in the active window
    x_p: int
    n_p: int
    margin: float
    actors: tuple[int, int]  # distinct actors counted: active, previous
    top_share: float  # the largest single actor's share of either window

    def testable(self, min_events: int, min_actors: int) -> bool:
        return min(self.n_a, self.n_p) >= min_events and min(self.actors) >= min_actors

    def counts(self) -> str:
        return (f"{self.name.replace('_', ' ')}: {self.n_a:,} vs {self.n_p:,} from "
                f"{self.actors[0]:,} vs {self.actors[1]:,} actors")  # fmt: skip

    def test(self, alpha: float) -> SignalTest:
        p = p_worse(self.x_a, self.n_a, self.x_p, self.n_p, self.margin)
        return SignalTest(self.name, self.x_a / self.n_a, self.x_p / self.n_p, self.n_a, self.n_p,
                          self.margin, p, alpha, self.actors, self.top_share)  # fmt: skip


def judge(
    active: AdapterFeedback,
    previous: AdapterFeedback,
    config: WatchConfig,
    max_actor_share: float | None = None,
) -> Verdict:
    """Compare the active adapter's window with its predecessor's (see the module doc)."""
    a, p = active, previous
    signals = (
        Signal("edit_rate", a.edited, a.handled, p.edited, p.handled, config.edit_rate_margin,
                (a.editors, p.editors), max(a.top_edit_share, p.top_edit_share)),
        Signal("thumbs_down_rate", a.down, a.rated, p.down, p.rated, config.thumbs_down_margin,
                (a.raters, p.raters), max(a.top_rating_share, p.top_rating_share)),
    )  # fmt: skip
    testable = [s for s in signals if s.testable(config.min_events, config.min_actors)]
    if not testable:
        return Verdict(
            "waiting",
            f"too few events or actors (need {config.min_events:,} events from "
            f"{config.min_actors:,} actors in both windows; "
            + ", ".join(s.counts() for s in signals) + ")",
        )  # fmt: skip
    tests = tuple(s.test(config.alpha / len(testable)) for s in testable)
    worse = [t for t in tests if t.regressed]
    trusted = [t for t in worse if max_actor_share is None or t.top_share <= max_actor_share]
    if trusted:
        return Verdict("regressed", "; ".join(t.describe() for t in trusted), tests)
    if worse:
        return Verdict(
            "refused",
            "; ".join(t.describe() for t in worse)
            + f": one actor supplies more than the gate's max_actor_share ({max_actor_share:g})"
            " of the evidence, so the watch does not act on it",
            tests,
        )
    return Verdict("ok", "; ".join(t.describe() for t in tests), tests)
