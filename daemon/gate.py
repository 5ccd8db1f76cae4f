"""The promotion gate: a pure decision over the trainer's eval report.

Every check reports its measured value and threshold, so a rejection says exactly why. A check
whose input was not measured fails (``value`` None): an adapter is never promoted on missing
evidence. Why the generation checks exist (DESIGN.md): plain DPO on ~60 SmolLM2 support
replies drove training loss to 0 and apologies from 55% to 0% by collapsing replies to 0.75
words; preference accuracy alone would have promoted that adapter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DETECTORS = ("non_finite_loss", "reference_mismatch", "sign_bug", "likelihood_collapse")


class GateConfig(BaseModel):
    """Thresholds of the promotion gate; each check can be turned off by setting it to null."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    kl_budget: float | None = Field(
        0.5, gt=0, description="max KL(candidate‖reference), nats/token"
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
    block_on_detectors: bool = Field(True, description="any training detector fired → reject")


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: float | str | None
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    promote: bool
    checks: list[Check] = field(default_factory=list)

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
        }


def _get(report: Mapping[str, Any] | None, *path: str) -> float | None:
    node: Any = report
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) else None


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


def _degenerate_rate(generation: Mapping[str, Any] | None) -> float | None:
    if not generation:
        return None
    parts = [_get(generation, k) for k in ("empty_rate", "short_rate", "repetitive_rate")]
    return None if any(p is None for p in parts) else max(p for p in parts if p is not None)


def _preference_checks(cand: Any, inc: Any, config: GateConfig) -> list[Check]:
    checks = []
    accuracy = _get(cand, "preference", "reward_accuracy")
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
        incumbent = _get(inc, "preference", "reward_accuracy")
        threshold = (incumbent or 0.0) + config.min_gain_over_incumbent
        checks.append(
            _at_least(
                "beats_incumbent", accuracy, threshold, "accuracy vs incumbent (+ minimum gain)"
            )
        )
    return checks


def _reference_checks(cand: Any, ref: Any, config: GateConfig) -> list[Check]:
    checks = []
    if config.factuality_tolerance is not None:
        reference = _get(ref, "factuality")
        threshold = None if reference is None else reference - config.factuality_tolerance
        value = _get(cand, "factuality")
        checks.append(
            _at_least("factuality", value, threshold, "factuality")
            if threshold is not None
            else Check("factuality", False, value, None, "reference factuality was not measured")
        )
    if config.kl_budget is not None:
        checks.append(
            _at_most(
                "kl_budget",
                _get(cand, "kl_to_reference"),
                config.kl_budget,
                "KL(candidate‖reference) nats/token",
            )
        )
    if config.chosen_logp_tolerance is not None:
        reference = _get(ref, "preference", "chosen_logps_per_token")
        value = _get(cand, "preference", "chosen_logps_per_token")
        threshold = None if reference is None else reference - config.chosen_logp_tolerance
        checks.append(
            _at_least("chosen_logp", value, threshold, "held-out chosen log-prob per token")
            if threshold is not None
            else Check(
                "chosen_logp", False, value, None, "reference chosen log-prob was not measured"
            )
        )
    return checks


def _generation_checks(cand: Any, ref: Any, config: GateConfig) -> list[Check]:
    checks = []
    generation = cand.get("generation") if isinstance(cand, Mapping) else None
    reference = ref.get("generation") if isinstance(ref, Mapping) else None
    if config.max_degenerate_rate is not None:
        checks.append(
            _at_most(
                "degenerate_replies",
                _degenerate_rate(generation),
                config.max_degenerate_rate,
                "share of empty/short/repetitive replies",
            )
        )
    if config.min_distinct_rate is not None:
        checks.append(
            _at_least(
                "distinct_replies",
                _get(generation, "distinct_rate"),
                config.min_distinct_rate,
                "share of distinct replies",
            )
        )
    if config.length_band is not None:
        low, high = config.length_band
        value, base = _get(generation, "median_words"), _get(reference, "median_words")
        if value is None or not base:
            checks.append(
                Check("reply_length", False, value, f"{low}-{high}x", "median length not measured")
            )
        else:
            ratio = value / base
            ok = low <= ratio <= high
            checks.append(
                Check(
                    "reply_length",
                    ok,
                    ratio,
                    f"{low}-{high}x",
                    f"median words {value:.0f} vs reference {base:.0f} = {ratio:.2f}x "
                    f"({'inside' if ok else 'outside'} {low}-{high}x)",
                )
            )
    if config.relevance_tolerance is not None:
        base = _get(reference, "relevance_rate")
        threshold = None if base is None else base - config.relevance_tolerance
        value = _get(generation, "relevance_rate")
        checks.append(
            _at_least("relevance", value, threshold, "share of replies that mention the request")
            if threshold is not None
            else Check("relevance", False, value, None, "reference relevance was not measured")
        )
    return checks


def decide_promotion(
    candidate: Mapping[str, Any],
    incumbent: Mapping[str, Any] | None,
    config: GateConfig,
) -> Decision:
    """Promote or reject. ``candidate`` is the trainer's eval report of the run — the
    ``candidate`` and ``reference`` sections of ``result.json`` ``eval`` plus its
    ``detectors`` — and ``incumbent`` the active adapter's report on the same held-out set
    (None when nothing is active yet)."""
    cand = candidate.get("candidate", {})
    ref = candidate.get("reference", {})
    checks = _preference_checks(cand, incumbent, config)
    checks += _reference_checks(cand, ref, config)
    checks += _generation_checks(cand, ref, config)
    if config.block_on_detectors:
        detectors = candidate.get("detectors", {}) or {}
        fired = [name for name in DETECTORS if (detectors.get(name) or {}).get("fired")]
        checks.append(
            Check(
                "training_detectors",
                not fired,
                float(len(fired)),
                0,
                "fired: " + ", ".join(fired) if fired else "none fired",
            )
        )
    return Decision(promote=all(c.passed for c in checks), checks=checks)
