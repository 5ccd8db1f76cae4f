"""Canary analysis: is the canary worse than the stable adapter *over the same hours*?

A pure decision over two windows of production feedback taken at the same time (the concurrent
control: Kayenta's, Argo Rollouts' and Flagger's way), so a change in traffic that moves both
adapters alike (a product launch, a holiday, a new agent team) cancels out, where the
sequential regression watch (:mod:`daemon.watch`) would read it as the adapter's doing.

Signals, each tested one-sided for "the canary is worse than stable by more than its margin"
with the watch's Agresti–Caffo statistic (:func:`daemon.watch.p_worse`) and Bonferroni over the
signals tested: agents' **edit rate**, users' **thumbs-down rate**, and the gate's own
detectors run on the **served drafts** the events carry (:mod:`trainer.verifier`): the share
stating a specific the event's conversation does not hold (**unsupported rate**), and of the
drafts a policy rule applies to (by the event's tags), the share breaking one (**policy
violation rate**). Edit size is reported, not tested. People, not events: each actor counts
at most ``edits_per_actor`` / ``ratings_per_actor`` events per window, and then each window is
judged *without its loudest actor* (the one with the most counted events), so no single
account can flip a verdict either way: a flood of "edited" verdicts and a flood of unedited
sends hiding a real regression are both left out. A signal is tested only with ``min_events``
counted events from ``min_actors`` actors in both windows, and a verdict one remaining actor
dominates (more than the gate's ``max_actor_share``) is not acted on.

Verdicts: **abort** (a trusted regression), **continue** (too little evidence, too little time
at this step, or a regression one actor shows), **widen** (to the next of ``steps``),
**promote** (to stable, after the last step; only a canary whose gate tier is ``stable``:
full promotion needs every gate check). :class:`daemon.rollout.CanaryAnalysis` gathers the
windows and acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator

from daemon.gate import ReviewedCanary
from daemon.watch import Signal, SignalTest
from feedback.base import FrozenModel
from feedback.production import AdapterFeedback, PerActor


class RolloutConfig(FrozenModel):
    """Staged exposure: canaries beside the stable adapter and their analysis."""

    canary: bool = Field(
        False,
        description="a candidate that passes every gate check serves a canary first (otherwise "
        "it goes straight to all traffic)",
    )
    reviewed: bool = Field(
        False,
        description="every draft is reviewed by an agent before a customer sees it: a candidate "
        "that fails only the reviewable checks (unsupported claims, policy), within the ceilings "
        "below, may serve a canary",
    )
    max_unsupported_rate: float = Field(
        0.2, ge=0, le=1, description="reviewed canary: ceiling on held-out unsupported claims"
    )
    min_policy_compliance: float = Field(
        0.8, ge=0, le=1, description="reviewed canary: floor on held-out policy compliance"
    )
    steps: tuple[float, ...] = Field(
        (0.1, 0.25, 0.5),
        min_length=1,
        description="the canary's traffic fractions, widened in this order; promotion follows "
        "the last",
    )
    action: Literal["auto", "alert"] = Field(
        "auto", description="act on each verdict (widen, promote, abort) or only report it"
    )
    interval_s: float = Field(300.0, gt=0, description="how often the analysis judges")
    min_step_hours: float = Field(
        1.0, ge=0, description="a step runs at least this long before it widens or promotes"
    )
    min_events: int = Field(
        100, gt=0, description="counted events a signal needs in both windows before a test"
    )
    min_actors: int = Field(
        5, gt=0, description="distinct actors a signal needs in both windows before a test"
    )
    max_events: int = Field(5000, gt=0, description="newest events per adapter and window")
    edit_rate_margin: float = Field(0.05, ge=0, le=1, description="tolerated edit-rate rise")
    thumbs_down_margin: float = Field(
        0.05, ge=0, le=1, description="tolerated thumbs-down-rate rise"
    )
    unsupported_margin: float = Field(
        0.02,
        ge=0,
        le=1,
        description="tolerated rise in served drafts stating unsupported specifics",
    )
    policy_margin: float = Field(
        0.02, ge=0, le=1, description="tolerated rise in served drafts breaking a policy rule"
    )
    alpha: float = Field(0.01, gt=0, lt=1, description="false-abort rate per judgement")
    edits_per_actor: int | None = Field(
        100, gt=0, description="an agent's newest edits counted per window (null: all)"
    )
    ratings_per_actor: int | None = Field(
        1, gt=0, description="a user's newest ratings counted per window"
    )

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < s < 1 for s in steps) or list(steps) != sorted(set(steps)):
            raise ValueError("steps must be increasing fractions between 0 and 1 (exclusive)")
        return steps

    def reviewed_canary(self) -> ReviewedCanary | None:
        """What the gate tolerates for a canary; None unless every draft is reviewed."""
        if not self.reviewed:
            return None
        return ReviewedCanary(self.max_unsupported_rate, self.min_policy_compliance)

    def per_actor(self) -> PerActor:
        return PerActor(edits=self.edits_per_actor, ratings=self.ratings_per_actor)

    def next_step(self, fraction: float) -> float | None:
        """The next wider fraction, or None at (or past) the last."""
        return next((s for s in self.steps if s > fraction + 1e-9), None)


@dataclass(frozen=True)
class DraftChecks:
    """The gate's detectors over the served drafts of one window (counted events only)."""

    drafts: int = 0
    unsupported: int = 0  # drafts stating a specific their conversation does not hold
    ruled: int = 0  # drafts a policy rule applies to
    broken: int = 0  # of those, breaking one
    actors: int = 0  # distinct actors whose events carried the drafts
    top_share: float = 0.0

    @property
    def unsupported_rate(self) -> float | None:
        return self.unsupported / self.drafts if self.drafts else None

    @property
    def policy_compliance(self) -> float | None:
        return 1 - self.broken / self.ruled if self.ruled else None


@dataclass(frozen=True)
class Window:
    """One adapter's production evidence over the analysis window."""

    feedback: AdapterFeedback
    drafts: DraftChecks
    left_out: int = 0  # events of the loudest actor, left out (:func:`daemon.rollout.window`)

    def describe(self) -> str:
        f, d = self.feedback, self.drafts
        parts = [
            f"edit rate {_rate(f.edit_rate)} of {f.handled:,} from {f.editors:,} agents",
            f"edit size {_rate(f.edit_size)}",
            f"thumbs down {_rate(f.thumbs_down_rate)} of {f.rated:,}",
            f"unsupported {_rate(d.unsupported_rate)} of {d.drafts:,} drafts",
            f"policy {_rate(d.policy_compliance)} of {d.ruled:,}",
        ]
        if self.left_out:
            events = "event" if self.left_out == 1 else "events"
            parts.append(f"{self.left_out:,} {events} of its loudest actor left out")
        return ", ".join(parts)


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


Action = Literal["continue", "widen", "promote", "abort"]


@dataclass(frozen=True)
class CanaryVerdict:
    action: Action
    reason: str
    canary: Window
    stable: Window
    tests: tuple[SignalTest, ...] = ()
    to_fraction: float | None = None  # widen: the new fraction

    def describe(self) -> str:
        """The verdict with both adapters' concurrent numbers (audit log, console, alerts)."""
        return (
            f"{self.action}: {self.reason} | canary: {self.canary.describe()} | "
            f"stable (same hours): {self.stable.describe()}"
        )


def _signals(canary: Window, stable: Window, config: RolloutConfig) -> list[Signal]:
    c, s = canary.feedback, stable.feedback
    cd, sd = canary.drafts, stable.drafts
    return [
        Signal("edit_rate", c.edited, c.handled, s.edited, s.handled, config.edit_rate_margin,
               (c.editors, s.editors), max(c.top_edit_share, s.top_edit_share)),
        Signal("thumbs_down_rate", c.down, c.rated, s.down, s.rated, config.thumbs_down_margin,
               (c.raters, s.raters), max(c.top_rating_share, s.top_rating_share)),
        Signal("unsupported_rate", cd.unsupported, cd.drafts, sd.unsupported, sd.drafts,
               config.unsupported_margin, (cd.actors, sd.actors), max(cd.top_share, sd.top_share)),
        Signal("policy_violation_rate", cd.broken, cd.ruled, sd.broken, sd.ruled,
               config.policy_margin, (cd.actors, sd.actors), max(cd.top_share, sd.top_share)),
    ]  # fmt: skip


def analyse(
    canary: Window,
    stable: Window,
    config: RolloutConfig,
    *,
    fraction: float,
    step_hours: float,
    tier: str | None,
    max_actor_share: float | None = None,
) -> CanaryVerdict:
    """The verdict on a canary at ``fraction`` for ``step_hours`` (see the module doc); ``tier``
    is the gate's for the canary's version (only ``stable`` may be promoted)."""

    def verdict(action: Action, reason: str, to: float | None = None) -> CanaryVerdict:
        return CanaryVerdict(action, reason, canary, stable, tests, to)

    tests: tuple[SignalTest, ...] = ()
    signals = _signals(canary, stable, config)
    testable = [s for s in signals if s.testable(config.min_events, config.min_actors)]
    if not testable:
        need = f"{config.min_events:,} events from {config.min_actors:,} actors in both windows"
        return verdict("continue", f"waiting for evidence (each signal needs {need})")
    tests = tuple(s.test(config.alpha / len(testable)) for s in testable)
    worse = [t for t in tests if t.regressed]
    trusted = [t for t in worse if max_actor_share is None or t.top_share <= max_actor_share]
    if trusted:
        return verdict("abort", "; ".join(t.describe() for t in trusted))
    if worse:
        return verdict(
            "continue",
            "; ".join(t.describe() for t in worse) + f": one actor supplies more than the gate's "
            f"max_actor_share ({max_actor_share:g}) of the evidence, so it is not acted on",
        )
    if step_hours < config.min_step_hours:
        return verdict(
            "continue",
            f"no regression so far; {step_hours:.1f} h of {config.min_step_hours:g} h at "
            f"{fraction:.0%}",
        )
    untested = [s.name for s in signals if s not in testable]
    clean = "no signal worse: " + "; ".join(t.describe() for t in tests)
    if untested:
        clean += f" ({', '.join(untested)}: too little evidence to test)"
    wider = config.next_step(fraction)
    if wider is not None:
        return verdict("widen", f"{clean}; widening {fraction:.0%} -> {wider:.0%}", wider)
    if tier != "stable":
        return verdict(
            "continue",
            f"{clean}; at the last step ({fraction:.0%}); promotion to stable needs every gate "
            f"check (its gate tier is {tier or 'unknown'}): the next refresh learns from its "
            "corrections",
        )
    return verdict("promote", f"{clean}; at the last step ({fraction:.0%})")
