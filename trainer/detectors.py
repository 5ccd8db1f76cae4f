"""Training failure detectors: pure functions over numbers the loop already has.

Each returns a :class:`Finding`. The loop decides what to do with it: a non-finite loss or a
reference mismatch aborts the run; a suspected sign bug or likelihood collapse is recorded in
``result.json`` (and the gate refuses a candidate whose run fired one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from statistics import fmean

from trainer.results import DetectorFinding


@dataclass(frozen=True)
class Finding:
    fired: bool
    detail: str = ""
    value: float | None = None

    def as_dict(self) -> DetectorFinding:
        """As ``result.json`` records it."""
        return DetectorFinding(fired=self.fired, detail=self.detail, value=self.value)


def non_finite_loss(loss: float, step: int) -> Finding:
    """NaN or ±inf anywhere in the loss poisons every weight it touches: stop at once."""
    if math.isfinite(loss):
        return Finding(False)
    return Finding(True, f"loss is {loss} at step {step}", loss)


def reference_mismatch(step0_loss: float, tolerance: float) -> Finding:
    """At step 0 with a fresh adapter, policy == reference, so every DPO-family loss is log 2.

    Anything else means the reference log-probs were not computed on the same model, template
    or tokens as the policy's (a cached reference from another base, a different chat
    template, a truncation mismatch) — training against them would be silently wrong.
    """
    gap = abs(step0_loss - math.log(2.0))
    if gap <= tolerance:
        return Finding(False, value=step0_loss)
    return Finding(
        True,
        f"step-0 loss {step0_loss:.6f} differs from log 2 = {math.log(2.0):.6f} by {gap:.2e} "
        f"(> {tolerance:g}): the reference does not match the policy",
        step0_loss,
    )


def reference_mismatch_per_token(mean_abs_logratio: float, tolerance: float) -> Finding:
    """The step-0 check for a half-precision base (bf16, fp16, NF4).

    There the reference pass and the training pass batch and pack the same sequences
    differently, and bf16 rounding makes their log-probs differ: measured on SmolLM2 with
    24-token replies, the step-0 loss is off log 2 by 0.018 per pair on average (up to 0.052),
    while the mean |log π − log π_ref| is 0.011 nats per token (up to 0.042 for one sequence).
    So the check is on that per-token mean, whose noise does not grow with reply length; a
    reference from another base or template is off by tenths of a nat per token or more. A
    per-sequence error below half precision's own noise (~0.35 nats on such a reply) cannot be
    told from it.
    """
    if mean_abs_logratio <= tolerance:
        return Finding(False, value=mean_abs_logratio)
    return Finding(
        True,
        f"step-0 mean |log π − log π_ref| is {mean_abs_logratio:.4f} nats per token "
        f"(> {tolerance:g}, the half-precision tolerance): the reference does not match the "
        "policy",
        mean_abs_logratio,
    )


def sign_bug(margins: Sequence[float], check_steps: int) -> Finding:
    """After the first ``check_steps`` optimiser steps the chosen side must be winning.

    ``margins`` are the per-step mean log-ratio margins, chosen minus rejected, computed from
    the log-probs by the loop (not from the loss's own reward outputs, so a loss called with
    its arguments swapped is caught). Step 0 is excluded: there the margin is 0 by definition.
    """
    window = list(margins[1 : check_steps + 1])
    if len(window) < check_steps:
        return Finding(False, f"only {len(window)} steps, need {check_steps}")
    mean_margin = fmean(window)
    if mean_margin > 0:
        return Finding(False, value=mean_margin)
    return Finding(
        True,
        f"mean chosen-minus-rejected log-ratio over steps 1..{check_steps} is {mean_margin:.4f} "
        "(not positive): training pushes the rejected response up — check the chosen/rejected "
        "columns and the loss's argument order",
        mean_margin,
    )


def likelihood_collapse(
    chosen_logps_per_token: Sequence[float],
    margins: Sequence[float],
    *,
    min_steps: int,
    min_drop: float,
) -> Finding:
    """The chosen response's likelihood falls steadily while the margin grows (DPOP's case).

    DPO only constrains the *difference* of log-ratios, so it can widen the margin by pushing
    both responses down. Compares the mean of the first and last quarter of the run: fires when
    chosen per-token log-prob dropped by more than ``min_drop`` nats, fell in most steps, and the
    margin rose.
    """
    n = len(chosen_logps_per_token)
    if n < min_steps:
        return Finding(False, f"only {n} steps, need {min_steps}")
    q = max(2, n // 4)
    drop = fmean(chosen_logps_per_token[:q]) - fmean(chosen_logps_per_token[-q:])
    margin_gain = fmean(margins[-q:]) - fmean(margins[:q])
    falling = sum(b < a for a, b in pairwise(chosen_logps_per_token))
    steady = falling >= (n - 1) / 2
    if drop > min_drop and margin_gain > 0 and steady:
        return Finding(
            True,
            f"chosen log-prob fell by {drop:.3f} nats/token while the margin grew by "
            f"{margin_gain:.3f}: likelihood collapse — consider dpop, rpo, or a larger beta",
            drop,
        )
    return Finding(False, value=drop)
