"""Preference losses over per-sequence log-probs.

Every function here is pure: tensors in, unreduced per-example losses and implicit rewards
out. No reduction, no ``.item()``, no logging, no device moves — the training loop owns those.

Shapes: every ``*_logps`` argument is ``(B,)`` and holds the *summed* log-probability of the
response tokens; every ``*_lengths`` argument is ``(B,)`` and holds the number of response
tokens (so ``logps / lengths`` is the per-token average). Rewards are the implicit rewards of
the papers, already scaled by β, and are detached: they are for logging and evaluation only.

All sigmoid-based losses use ``logsigmoid`` so that margins of ±1000 give finite losses and
gradients (``log(sigmoid(x))`` underflows to ``log(0)`` already near x = −104 in float32).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLoss(NamedTuple):
    """Output of a paired (chosen vs rejected) loss; every field is ``(B,)``."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


class UnpairedLoss(NamedTuple):
    """Output of an unpaired loss (KTO, APO-zero); every field is ``(B,)``."""

    losses: Tensor
    rewards: Tensor


def per_token(logps: Tensor, lengths: Tensor) -> Tensor:
    """Average log-prob per response token: ``logps / lengths``, shape ``(B,)``."""
    return logps / lengths.clamp(min=1).to(logps.dtype)


def _paired_rewards(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    return (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PairLoss:
    """DPO (Rafailov et al. 2023, eq. 7), and conservative DPO when ``label_smoothing`` ε > 0.

    With Δ = (log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l)):
    ``loss = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)``. At Δ = 0 (a fresh adapter) the loss is log 2
    for every ε, which the training loop uses to detect a mismatched reference.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits
    )
    return PairLoss(losses, *_paired_rewards(chosen_logratios, rejected_logratios, beta))


def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> PairLoss:
    """Robust DPO for labels flipped with probability ε (Chowdhury et al. 2024, eq. 8).

    ``loss = [−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1 − 2ε)``, an unbiased estimate of the clean
    DPO loss under symmetric label noise. Requires 0 ≤ ε < 0.5.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return PairLoss(losses, *_paired_rewards(chosen_logratios, rejected_logratios, beta))


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> PairLoss:
    """IPO (Azar et al. 2023, eq. 17) on per-token averaged log-ratios.

    ``loss = (Δ̄ − 1/(2β))²`` where Δ̄ uses log-ratios divided by the response token counts.
    β here is IPO's τ: smaller β asks for a larger margin. Rewards use the same averaged
    log-ratios, times β.
    """
    chosen_logratios = per_token(policy_chosen_logps - reference_chosen_logps, chosen_lengths)
    rejected_logratios = per_token(
        policy_rejected_logps - reference_rejected_logps, rejected_lengths
    )
    losses = (chosen_logratios - rejected_logratios - 1.0 / (2.0 * beta)) ** 2
    return PairLoss(losses, *_paired_rewards(chosen_logratios, rejected_logratios, beta))


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> PairLoss:
    """SLiC-HF calibration loss with a reference (Zhao et al. 2023): ``max(0, 1 − βΔ)``."""
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = torch.relu(1.0 - beta * (chosen_logratios - rejected_logratios))
    return PairLoss(losses, *_paired_rewards(chosen_logratios, rejected_logratios, beta))


def dpop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    lambda_: float = 50.0,
) -> PairLoss:
    """DPO-Positive (Pal et al. 2024, eq. 3).

    ``loss = −logσ(β·(Δ − λ·max(0, log π_ref(y_w) − log π_θ(y_w))))``: the penalty switches on
    only when the chosen response becomes *less* likely than under the reference, which is
    exactly the likelihood collapse plain DPO allows. λ = 50 is the paper's default.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    penalty = torch.relu(reference_chosen_logps - policy_chosen_logps)
    logits = beta * (chosen_logratios - rejected_logratios - lambda_ * penalty)
    losses = -F.logsigmoid(logits)
    return PairLoss(losses, *_paired_rewards(chosen_logratios, rejected_logratios, beta))


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> PairLoss:
    """SimPO (Meng et al. 2024, eq. 6): reference-free and length-normalised.

    ``loss = −logσ(β·(log π(y_w)/|y_w| − log π(y_l)/|y_l|) − γ)`` with γ the target reward
    margin (an absolute value, not TRL's γ/β ratio). Rewards are β times the per-token log-probs.
    """
    chosen_avg = per_token(policy_chosen_logps, chosen_lengths)
    rejected_avg = per_token(policy_rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)
    return PairLoss(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate near 0 and for very negative x (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> PairLoss:
    """The odds-ratio term of ORPO (Hong et al. 2024, eqs. 4–7), weighted by β (their λ).

    With p̄ the per-token average log-prob, ``log odds(y) = p̄ − log(1 − exp(p̄))`` and
    ``loss = −β·logσ(log odds(y_w) − log odds(y_l))``. ORPO's NLL term on the chosen response
    is *not* included: the caller adds ``nll_loss`` so that it can be logged separately.
    """
    chosen_avg = per_token(policy_chosen_logps, chosen_lengths)
    rejected_avg = per_token(policy_rejected_logps, rejected_lengths)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    losses = -beta * F.logsigmoid(log_odds)
    return PairLoss(losses, (beta * chosen_avg).detach(), (beta * rejected_avg).detach())


def nll_loss(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-token negative log-likelihood of the chosen response, ``(B,)``.

    Added to DPO with weight α it gives RPO (Pang et al. 2024, eq. 4; "DPO + NLL"), and to the
    odds-ratio term it gives ORPO. It anchors the chosen response's likelihood.
    """
    return -per_token(policy_chosen_logps, chosen_lengths)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl_estimate: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> UnpairedLoss:
    """KTO (Ethayarajh et al. 2024, eq. 7), one row per (prompt, completion, label).

    With r = log π_θ(y|x) − log π_ref(y|x) and z₀ the KL estimate (a scalar, detached and
    clamped at 0 as in the paper):
    desirable rows: ``λ_D·(1 − σ(β(r − z₀)))``; undesirable rows: ``λ_U·(1 − σ(β(z₀ − r)))``.
    ``desirable`` is a bool tensor ``(B,)``; a batch with only one kind of row is fine.
    """
    logratios = policy_logps - reference_logps
    z0 = kl_estimate.detach().clamp(min=0)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratios)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return UnpairedLoss(losses, (beta * logratios).detach())


def apo_zero_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
) -> UnpairedLoss:
    """Unpaired APO-zero (D'Oosterlinck et al. 2024, eq. 8 without the pairing).

    Desirable rows push their log-ratio up, ``1 − σ(β r)``; undesirable rows push it down,
    ``σ(β r)``. Use when the desirable answers are better than what the model says now.
    """
    logratios = policy_logps - reference_logps
    losses = torch.where(
        desirable, 1.0 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios)
    )
    return UnpairedLoss(losses, (beta * logratios).detach())
