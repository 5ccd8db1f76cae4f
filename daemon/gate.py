"""The promotion gate: a pure decision over the trainer's eval report.

Every check reports its measured value and threshold, so a rejection says exactly why. A check
whose input was not measured fails (``value`` None): an adapter is never promoted on missing
evidence. Why the generation checks exist (docs/ARCHITECTURE.md, "Why the gate looks at
replies"): plain DPO on ~60 SmolLM2 support
replies drove training loss to 0 and apologies from 55% to 0% by collapsing replies to 0.75
words; preference accuracy alone would have promoted that adapter.

Past 400 lines on purpose: the decision and every check it makes, with their thresholds, in one
pure module that its table test covers whole; a check read elsewhere is a check nobody reviews.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from feedback.base import FrozenModel, refuse_retired
from feedback.manifest import ActorShares
from trainer.results import AdapterEval, DetectorFinding, EvalReport

DETECTORS = ("non_finite_loss", "reference_mismatch", "sign_bug", "likelihood_collapse")

# Nats per retain reply. Measured on SmolLM2-135M (docs/operations.md, "The drift budget"): the
# reference against itself 0; RPO candidates at lr 2e-4 (two seeds) ~0.2; the demo's round-1
# candidates 10-12 with a 2-6 point factuality loss; ten times the learning rate 23-81.
DRIFT_BUDGET = 5.0


class GateConfig(FrozenModel):
    """Thresholds of the promotion gate; each check can be turned off by setting it to null."""

    policy: str = Field(
        "auto", pattern="^(auto|manual)$", description="auto-promote on pass, or hold"
    )
    min_preference_accuracy: float | None = Field(
        0.6, ge=0, le=1, description="held-out reward accuracy"
    )
    min_gain_over_incumbent: float | None = Field(
        0.0, description="accuracy gain over the active adapter"
    )
    factuality_tolerance: float | None = Field(
        0.02, ge=0, description="allowed drop vs the reference"
    )
    drift_budget: float | None = Field(
        DRIFT_BUDGET,
        gt=0,
        description="max drift: mean KL(reference‖candidate) in nats summed per reply, on the "
        "reference's replies to the retain set (prompts unrelated to the feedback)",
    )
    chosen_logp_tolerance: float | None = Field(
        0.05,
        ge=0,
        description="allowed drop of held-out chosen log-prob per token vs the reference",
    )
    max_degenerate_rate: float | None = Field(
        0.05, ge=0, le=1, description="empty/short/repetitive replies"
    )
    min_distinct_rate: float | None = Field(
        0.8, ge=0, le=1, description="distinct replies to distinct prompts"
    )
    length_band: tuple[float, float] | None = Field(
        (0.15, 1.5), description="median reply length relative to the reference's"
    )
    relevance_tolerance: float | None = Field(
        0.2, ge=0, description="allowed drop in replies that mention the request"
    )
    unsupported_tolerance: float | None = Field(
        0.02,
        ge=0,
        description="allowed rise vs the reference in replies stating specifics the conversation "
        "lacks",
    )
    max_unsupported_rate: float | None = Field(
        0.05, ge=0, le=1, description="ceiling on replies stating unsupported specifics"
    )
    policy_tolerance: float | None = Field(
        0.0, ge=0, description="allowed drop in policy compliance vs the reference"
    )
    min_policy_compliance: float | None = Field(
        0.95, ge=0, le=1, description="floor on replies obeying the policy rules that apply"
    )
    max_actor_share: float | None = Field(
        0.3,
        gt=0,
        le=1,
        description="largest share of the snapshot's rows (all, and held-out) one actor may "
        "supply; events naming no actor count as one",
    )
    curated_heldout: Path | None = Field(
        None,
        description="an operator-curated pairs file (JSONL/parquet: prompt, chosen, rejected) "
        "every candidate is also scored on",
    )
    min_curated_accuracy: float | None = Field(
        0.6, ge=0, le=1, description="reward accuracy on curated_heldout, when one is set"
    )
    block_on_detectors: bool = Field(True, description="any training detector fired → reject")

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data: Any) -> Any:
        return refuse_retired(
            data,
            {
                "kl_budget": "was replaced by drift_budget (nats per reply on the retain set, "
                "not nats per token on the chosen replies): see "
                "docs/operations.md#the-drift-budget"
            },
        )

    @field_validator("curated_heldout")
    @classmethod
    def _curated_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | str | None
    detail: str = ""


Tier = Literal["stable", "canary", "none"]
# What a reviewer would catch in a draft before a customer sees it: the only checks a reviewed
# canary may fail (within :class:`ReviewedCanary`'s ceilings). Every other check is hard.
REVIEWABLE = ("unsupported_claims", "policy_compliance")


@dataclass(frozen=True)
class ReviewedCanary:
    """A deployment where agents review every draft (``rollout.reviewed``): how far a canary's
    held-out replies may miss the reviewable checks (full promotion still needs them all)."""

    max_unsupported_rate: float
    min_policy_compliance: float


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)
    tier: Tier = "none"  # the widest exposure the checks allow: all traffic, a canary, none
    tier_reason: str = ""

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def reasons(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.failed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "promote": self.promote,
            "checks": [asdict(c) for c in self.checks],
            "reasons": self.reasons,
            "tier": self.tier,
            "tier_reason": self.tier_reason,
        }


def _at_least(name: str, value: float | None, threshold: float, what: str) -> Check:
    if value is None:
        return Check(name, False, None, threshold, f"{what} was not measured")
    ok = value >= threshold
    return Check(
        name, ok, value, threshold, f"{what} {value:.4f} {'>=' if ok else '<'} {threshold:.4f}"
    )


def _at_most(name: str, value: float | None, threshold: float, what: str) -> Check:
    if value is None:
        return Check(name, False, None, threshold, f"{what} was not measured")
    ok = value <= threshold
    return Check(
        name, ok, value, threshold, f"{what} {value:.4f} {'<=' if ok else '>'} {threshold:.4f}"
    )


def _preference_checks(
    cand: AdapterEval, inc: AdapterEval | None, config: GateConfig
) -> list[Check]:
    checks = []
    accuracy = cand.preference.reward_accuracy if cand.preference else None
    if config.min_preference_accuracy is not None:
        checks.append(
            _at_least(
                "preference_accuracy",
                accuracy,
                config.min_preference_accuracy,
                "held-out preference accuracy",
            )
        )
    if config.min_gain_over_incumbent is not None and inc is not None:
        incumbent = inc.preference.reward_accuracy if inc.preference else None
        threshold = (incumbent or 0.0) + config.min_gain_over_incumbent
        checks.append(
            _at_least(
                "beats_incumbent", accuracy, threshold, "accuracy vs incumbent (+ minimum gain)"
            )
        )
    return checks


def _relative_at_least(
    name: str, value: float | None, reference: float | None, tolerance: float, what: str
) -> Check:
    """``value`` ≥ the reference's − ``tolerance``; fails when the reference was not measured."""
    if reference is None:
        return Check(name, False, value, None, f"reference {what} was not measured")
    return _at_least(name, value, reference - tolerance, what)


def _reference_checks(cand: AdapterEval, ref: AdapterEval, config: GateConfig) -> list[Check]:
    checks = []
    if config.factuality_tolerance is not None:
        checks.append(
            _relative_at_least(
                "factuality",
                cand.factuality,
                ref.factuality,
                config.factuality_tolerance,
                "factuality",
            )
        )
    if config.drift_budget is not None:
        drift = cand.retain_kl
        check = _at_most(
            "drift",
            drift.nats_per_reply if drift else None,
            config.drift_budget,
            "KL(reference‖candidate) nats per retain reply",
        )
        if drift is not None:
            interval = f" (±{drift.ci95:.2f}, 95% interval over {drift.num_replies} replies)"
            check = replace(check, detail=check.detail + interval)
        checks.append(check)
    if config.chosen_logp_tolerance is not None:
        checks.append(
            _relative_at_least(
                "chosen_logp",
                cand.preference.chosen_logps_per_token if cand.preference else None,
                ref.preference.chosen_logps_per_token if ref.preference else None,
                config.chosen_logp_tolerance,
                "held-out chosen log-prob per token",
            )
        )
    return checks


def _length_check(value: float | None, base: float | None, band: tuple[float, float]) -> Check:
    low, high = band
    if value is None or not base:
        return Check("reply_length", False, value, f"{low}-{high}x", "median length not measured")
    ratio = value / base
    ok = low <= ratio <= high
    return Check(
        "reply_length",
        ok,
        ratio,
        f"{low}-{high}x",
        f"median words {value:.0f} vs reference {base:.0f} = {ratio:.2f}x "
        f"({'inside' if ok else 'outside'} {low}-{high}x)",
    )


def _generation_checks(cand: AdapterEval, ref: AdapterEval, config: GateConfig) -> list[Check]:
    checks = []
    generation, reference = cand.generation, ref.generation
    if config.max_degenerate_rate is not None:
        checks.append(
            _at_most(
                "degenerate_replies",
                generation.degenerate_rate if generation else None,
                config.max_degenerate_rate,
                "share of empty/short/repetitive replies",
            )
        )
    if config.min_distinct_rate is not None:
        checks.append(
            _at_least(
                "distinct_replies",
                generation.distinct_rate if generation else None,
                config.min_distinct_rate,
                "share of distinct replies",
            )
        )
    if config.length_band is not None:
        checks.append(
            _length_check(
                generation.median_words if generation else None,
                reference.median_words if reference else None,
                config.length_band,
            )
        )
    if config.relevance_tolerance is not None:
        checks.append(
            _relative_at_least(
                "relevance",
                generation.relevance_rate if generation else None,
                reference.relevance_rate if reference else None,
                config.relevance_tolerance,
                "share of replies that mention the request",
            )
        )
    return checks


def _bounded(
    name: str,
    value: float | None,
    bounds: list[tuple[float, str]],
    what: str,
    *,
    upper: bool,
) -> Check:
    """``value`` against the tightest of ``bounds`` ((threshold, where it comes from), ...)."""
    pick = min if upper else max
    threshold, source = pick(bounds, key=lambda bound: bound[0])
    if value is None:
        return Check(name, False, None, threshold, f"{what} was not measured")
    ok = value <= threshold if upper else value >= threshold
    sign = ("<=" if ok else ">") if upper else (">=" if ok else "<")
    return Check(
        name, ok, value, threshold, f"{what} {value:.4f} {sign} {threshold:.4f} ({source})"
    )


def _grounding_checks(cand: AdapterEval, ref: AdapterEval, config: GateConfig) -> list[Check]:
    """Does the candidate state things the conversation does not support, or break a policy
    rule, more than the reference does (and more than the configured limit)?"""
    checks = []
    generation, reference = cand.generation, ref.generation
    if config.unsupported_tolerance is not None or config.max_unsupported_rate is not None:
        name, what = "unsupported_claims", "share of replies stating unsupported specifics"
        bounds = []
        if config.max_unsupported_rate is not None:
            bounds.append((config.max_unsupported_rate, "ceiling"))
        ref_rate = reference.unsupported_rate if reference else None
        if config.unsupported_tolerance is not None:
            if ref_rate is None:
                checks.append(Check(name, False, None, None, f"reference {what} was not measured"))
                bounds = []
            else:
                bounds.append(
                    (
                        ref_rate + config.unsupported_tolerance,
                        f"reference {ref_rate:.4f} + tolerance",
                    )
                )
        if bounds:
            value = generation.unsupported_rate if generation else None
            checks.append(_bounded(name, value, bounds, what, upper=True))
    if config.policy_tolerance is not None or config.min_policy_compliance is not None:
        checks.append(_policy_check(cand, ref, config))
    return checks


def _policy_check(cand: AdapterEval, ref: AdapterEval, config: GateConfig) -> Check:
    name, what = "policy_compliance", "share of replies obeying the policy rules"
    generation, reference = cand.generation, ref.generation
    if generation is not None and generation.num_replies and not generation.policy_rules:
        return Check(name, True, None, None, "no policy rules configured (eval.policy_rules)")
    if generation is None or generation.policy_compliance is None:
        return Check(
            name, False, None, None, "not measured: no held-out reply to a prompt a rule applies to"
        )
    bounds = []
    if config.min_policy_compliance is not None:
        bounds.append((config.min_policy_compliance, "floor"))
    ref_rate = reference.policy_compliance if reference else None
    if config.policy_tolerance is not None:
        if ref_rate is None:
            return Check(
                name,
                False,
                generation.policy_compliance,
                None,
                f"reference {what} was not measured",
            )
        bounds.append((ref_rate - config.policy_tolerance, f"reference {ref_rate:.4f} - tolerance"))
    detail = f" on {generation.policy_replies} replies"
    return _bounded(name, generation.policy_compliance, bounds, what + detail, upper=False)


def _evidence_checks(
    cand: AdapterEval, actors: ActorShares | None, config: GateConfig
) -> list[Check]:
    """Whose evidence the held-out numbers are, and the operator's own curated set."""
    checks = []
    if config.max_actor_share is not None:
        if actors is None:
            checks.append(Check("actor_share", False, None, config.max_actor_share, "not measured"))
        else:
            share = max(actors.largest_share, actors.largest_heldout_share)
            top = actors.top[0] if actors.top else None
            who = f" ({top.kind or 'no'} actor {top.actor})" if top else ""
            checks.append(
                _at_most(
                    "actor_share",
                    share,
                    config.max_actor_share,
                    "largest single-actor share of the snapshot's rows" + who,
                )
            )
    if config.curated_heldout is not None and config.min_curated_accuracy is not None:
        accuracy = cand.curated.reward_accuracy if cand.curated else None
        checks.append(
            _at_least(
                "curated_accuracy",
                accuracy,
                config.min_curated_accuracy,
                "reward accuracy on the curated held-out set",
            )
        )
    return checks


def exposure_tier(checks: list[Check], reviewed: ReviewedCanary | None) -> tuple[Tier, str]:
    """The widest exposure ``checks`` allow, and why. Every check passed: ``stable`` (all
    traffic). Only reviewable checks failed, the deployment reviews every draft, and the
    candidate is within the reviewed ceilings: ``canary``. Anything else: ``none``."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return "stable", "every check passed"
    hard = [c.name for c in failed if c.name not in REVIEWABLE]
    if hard:
        return "none", "hard checks failed: " + ", ".join(hard)
    names = ", ".join(c.name for c in failed)
    if reviewed is None:
        return (
            "none",
            f"{names} failed and rollout.reviewed is off: drafts reach customers unreviewed",
        )
    over = []
    for check in failed:
        upper = check.name == "unsupported_claims"
        ceiling = reviewed.max_unsupported_rate if upper else reviewed.min_policy_compliance
        value = check.value
        if value is None or (value > ceiling if upper else value < ceiling):
            shown = "not measured" if value is None else f"{value:.4f}"
            sign = "<=" if upper else ">="
            over.append(f"{check.name} {shown}, not {sign} {ceiling:.4f} (reviewed canary ceiling)")
    if over:
        return "none", "; ".join(over)
    return "canary", f"only {names} failed, within the reviewed canary ceilings"


def decide_promotion(
    report: EvalReport,
    detectors: Mapping[str, DetectorFinding],
    config: GateConfig,
    actors: ActorShares | None = None,
    reviewed: ReviewedCanary | None = None,
) -> Decision:
    """Promote or reject, from the run's eval report (candidate, reference and — when an
    adapter was active — incumbent, all on the same held-out set), its training detectors and
    who supplied the snapshot's rows (its manifest's ``actors``). ``promote`` needs every check;
    ``tier`` says how far the candidate may be exposed (:func:`exposure_tier`): with
    ``reviewed`` (every draft reviewed before a customer sees it), a candidate failing only the
    reviewable checks within their ceilings may serve a canary."""
    cand, ref = report.candidate, report.reference
    checks = _preference_checks(cand, report.incumbent, config)
    checks += _evidence_checks(cand, actors, config)
    checks += _reference_checks(cand, ref, config)
    checks += _generation_checks(cand, ref, config)
    checks += _grounding_checks(cand, ref, config)
    if config.block_on_detectors:
        fired = [name for name in DETECTORS if name in detectors and detectors[name]["fired"]]
        checks.append(
            Check(
                "training_detectors",
                not fired,
                float(len(fired)),
                0,
                "fired: " + ", ".join(fired) if fired else "none fired",
            )
        )
    tier, why = exposure_tier(checks, reviewed)
    return Decision(promote=tier == "stable", checks=checks, tier=tier, tier_reason=why)
