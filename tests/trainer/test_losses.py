"""Loss numerics: hand-computed values, gradient signs, and edge cases.

Every expected number below is worked out from the formula in the comment next to it, not
read back from the implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer import losses as L


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def softplus(x: float) -> float:
    """-log σ(x) = log(1 + e^{-x})"""
    return math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# The seeds' worked example: policy chosen −3.5, rejected −6.0;
# reference chosen −4.0, rejected −5.0.
PC, PR, RC, RR = -3.5, -6.0, -4.0, -5.0


def test_dpo_worked_example() -> None:
    # Δ = (−3.5 − −4.0) − (−6.0 − −5.0) = 0.5 + 1.0 = 1.5; βΔ = 0.75; loss = log(1 + e^−0.75)
    out = L.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5)
    assert out.losses.item() == pytest.approx(0.3868, abs=1e-4)
    assert out.losses.item() == pytest.approx(softplus(0.75), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.25)  # 0.5 · 0.5
    assert out.rejected_rewards.item() == pytest.approx(-0.5)  # 0.5 · −1.0


def test_dpo_worked_example_gradient_scale() -> None:
    # d loss / d π_c = −β σ(−βΔ) = −0.5 · σ(−0.75); the "gradient scale" is σ(−0.75) ≈ 0.321.
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    L.dpo_loss(pc, pr, t(RC), t(RR), beta=0.5).losses.sum().backward()
    assert sigmoid(-0.75) == pytest.approx(0.321, abs=1e-3)
    assert pc.grad.item() == pytest.approx(-0.5 * sigmoid(-0.75), rel=1e-5)
    assert pr.grad.item() == pytest.approx(+0.5 * sigmoid(-0.75), rel=1e-5)


def test_cdpo_label_smoothing() -> None:
    # −(1−ε)logσ(0.75) − ε logσ(−0.75) with ε = 0.1
    out = L.dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(
        0.9 * softplus(0.75) + 0.1 * softplus(-0.75), rel=1e-6
    )


def test_robust_dpo() -> None:
    # [(1−ε)·softplus(−x)... ] : ((1−ε)·(−logσ(x)) + ε·logσ(−x)) / (1 − 2ε), x = 0.75, ε = 0.1
    out = L.robust_dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5, label_smoothing=0.1)
    expected = (0.9 * softplus(0.75) - 0.1 * softplus(-0.75)) / 0.8
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.robust_dpo_loss(t(PC), t(PR), t(RC), t(RR), label_smoothing=0.5)


def test_ipo_uses_per_token_log_ratios() -> None:
    # chosen log-ratio 0.5 over 5 tokens = 0.1; rejected −1.0 over 2 tokens = −0.5; Δ̄ = 0.6
    # β = 0.5 → target 1/(2β) = 1.0; loss = (0.6 − 1.0)² = 0.16
    out = L.ipo_loss(t(PC), t(PR), t(RC), t(RR), t(5), t(2), beta=0.5)
    assert out.losses.item() == pytest.approx(0.16, rel=1e-5)
    assert out.chosen_rewards.item() == pytest.approx(0.05)  # β · 0.1


def test_hinge() -> None:
    # max(0, 1 − βΔ) = 1 − 0.75 = 0.25; and 0 once βΔ ≥ 1
    assert L.hinge_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5).losses.item() == pytest.approx(0.25)
    assert L.hinge_loss(t(PC), t(PR), t(RC), t(RR), beta=1.0).losses.item() == 0.0


def test_dpop_penalty_only_when_chosen_falls_below_reference() -> None:
    # Chosen above reference (−3.5 > −4.0): no penalty, equals DPO.
    out = L.dpop_loss(t(PC), t(PR), t(RC), t(RR), beta=0.5, lambda_=50.0)
    assert out.losses.item() == pytest.approx(softplus(0.75), rel=1e-6)
    # Chosen at −4.5 (0.5 below reference): Δ = −0.5 + 1.0 = 0.5, penalty 50·0.5 = 25,
    # logits = 0.5·(0.5 − 25) = −12.25, loss = softplus(−12.25)
    out = L.dpop_loss(t(-4.5), t(PR), t(RC), t(RR), beta=0.5, lambda_=50.0)
    assert out.losses.item() == pytest.approx(softplus(-12.25), rel=1e-6)


def test_simpo() -> None:
    # avg chosen −3.5/5 = −0.7; avg rejected −6/3 = −2.0; β=2, γ=0.5: x = 2·1.3 − 0.5 = 2.1
    out = L.simpo_loss(t(PC), t(PR), t(5), t(3), beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(softplus(2.1), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-1.4)


def test_orpo() -> None:
    # avg chosen −3.5/5 = −0.7; avg rejected −6/3 = −2.0
    # log odds(p) = p − log(1 − e^p)
    def log_odds(p: float) -> float:
        return p - math.log(1 - math.exp(p))

    x = log_odds(-0.7) - log_odds(-2.0)
    out = L.orpo_loss(t(PC), t(PR), t(5), t(3), beta=0.1)
    assert out.losses.item() == pytest.approx(0.1 * softplus(x), rel=1e-5)


def test_nll_is_per_token() -> None:
    assert L.nll_loss(t(-3.5), t(5)).item() == pytest.approx(0.7)


def test_kto_eq7_both_classes() -> None:
    # r = (−3.5 − −4.0) = 0.5 desirable; r = (−6.0 − −5.0) = −1.0 undesirable; z0 = 0.2, β = 0.5
    # desirable: 1 − σ(0.5·(0.5 − 0.2)) = 1 − σ(0.15)
    # undesirable: 1 − σ(0.5·(0.2 + 1.0)) = 1 − σ(0.6)
    out = L.kto_loss(
        t(PC, PR),
        t(RC, RR),
        torch.tensor([True, False]),
        t(0.2),
        beta=0.5,
        desirable_weight=2.0,
        undesirable_weight=1.0,
    )
    assert out.losses.tolist() == pytest.approx(
        [2 * (1 - sigmoid(0.15)), 1 - sigmoid(0.6)], rel=1e-6
    )
    assert out.rewards.tolist() == pytest.approx([0.25, -0.5])


@pytest.mark.parametrize("desirable", [[True, True], [False, False]])
def test_kto_batch_with_one_class_only(desirable: list[bool]) -> None:
    pol = t(PC, PR).requires_grad_()
    out = L.kto_loss(pol, t(RC, RR), torch.tensor(desirable), t(0.0), beta=0.5)
    out.losses.mean().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pol.grad).all()
    # desirable rows are pushed up, undesirable rows down
    assert (pol.grad < 0).all() if desirable[0] else (pol.grad > 0).all()


def test_kto_kl_estimate_clamped_and_detached() -> None:
    kl = t(-3.0).requires_grad_()
    a = L.kto_loss(t(PC), t(RC), torch.tensor([True]), kl, beta=0.5)
    b = L.kto_loss(t(PC), t(RC), torch.tensor([True]), t(0.0), beta=0.5)
    assert a.losses.item() == pytest.approx(b.losses.item())  # negative z0 clamps to 0
    assert not a.losses.requires_grad


def test_apo_zero() -> None:
    # desirable: 1 − σ(β r) with r = 0.5; undesirable: σ(β r) with r = −1.0; β = 0.5
    out = L.apo_zero_loss(t(PC, PR), t(RC, RR), torch.tensor([True, False]), beta=0.5)
    assert out.losses.tolist() == pytest.approx([1 - sigmoid(0.25), sigmoid(-0.5)], rel=1e-6)


PAIRED = {
    "dpo": lambda pc, pr, rc, rr, n: L.dpo_loss(pc, pr, rc, rr, beta=0.5),
    "cdpo": lambda pc, pr, rc, rr, n: L.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1),
    "robust": lambda pc, pr, rc, rr, n: L.robust_dpo_loss(
        pc, pr, rc, rr, beta=0.5, label_smoothing=0.1
    ),
    "ipo": lambda pc, pr, rc, rr, n: L.ipo_loss(pc, pr, rc, rr, n, n, beta=0.5),
    "hinge": lambda pc, pr, rc, rr, n: L.hinge_loss(pc, pr, rc, rr, beta=0.1),
    "dpop": lambda pc, pr, rc, rr, n: L.dpop_loss(pc, pr, rc, rr, beta=0.5),
    "simpo": lambda pc, pr, rc, rr, n: L.simpo_loss(pc, pr, n, n),
    "orpo": lambda pc, pr, rc, rr, n: L.orpo_loss(pc, pr, n, n),
}


@pytest.mark.parametrize("name", sorted(PAIRED))
def test_gradient_signs(name: str) -> None:
    """Minimising any paired loss raises the chosen log-prob and lowers the rejected one."""
    pc, pr = t(-12.0).requires_grad_(), t(-14.0).requires_grad_()
    PAIRED[name](pc, pr, t(-12.5), t(-13.0), t(10)).losses.sum().backward()
    assert pc.grad.item() < 0, "descent must push the chosen log-prob up"
    assert pr.grad.item() > 0, "descent must push the rejected log-prob down"


@pytest.mark.parametrize("name", sorted(PAIRED))
@pytest.mark.parametrize("margin", [1000.0, -1000.0])
def test_extreme_margins_stay_finite(name: str, margin: float) -> None:
    # log-probs stay ≤ 0; the winner is 1000 nats ahead (or behind) of the loser
    pc = t(-1.0 if margin > 0 else -1001.0).requires_grad_()
    pr = t(-1001.0 if margin > 0 else -1.0).requires_grad_()
    out = PAIRED[name](pc, pr, t(-1.0), t(-1.0), t(1))
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all(), out.losses
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("margin", [1000.0, -1000.0])
def test_dpo_extreme_margins_have_right_limits(margin: float) -> None:
    # −logσ(x) → 0 for x → +∞ and → −x for x → −∞ (no log(0) = inf)
    out = L.dpo_loss(t(margin), t(0.0), t(0.0), t(0.0), beta=1.0)
    assert out.losses.item() == pytest.approx(max(0.0, -margin), abs=1e-3)
    naive = -torch.log(torch.sigmoid(t(margin)))
    assert margin > 0 or not torch.isfinite(naive).all()  # the naive form really does overflow


@pytest.mark.parametrize("margin", [1000.0, -1000.0])
def test_unpaired_extreme_margins(margin: float) -> None:
    pol = t(margin, margin).requires_grad_()
    desirable = torch.tensor([True, False])
    for out in (
        L.kto_loss(pol, t(0.0, 0.0), desirable, t(0.0)),
        L.apo_zero_loss(pol, t(0.0, 0.0), desirable),
    ):
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(pol.grad).all()


def test_losses_are_unreduced_and_batched() -> None:
    pc, pr, rc, rr = t(PC, -1.0, -2.0), t(PR, -1.0, -3.0), t(RC, -1.0, -2.0), t(RR, -1.0, -2.0)
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert out.losses.shape == (3,)
    assert out.losses[1].item() == pytest.approx(math.log(2.0))  # Δ = 0 → log 2
    assert out.losses[2].item() == pytest.approx(-F.logsigmoid(t(0.5)).item())  # Δ = 1
