"""The training methods: one table that the run spec, the daemon's config, the CLI, the
objectives' dispatch and docs/reference.md's method list are all derived from.

Adding a method = one :class:`Method` entry here + its loss in ``trainer.losses`` + a test of
the loss. Each entry's ``pair_loss`` / ``unpaired_loss`` adapts the run's hyperparameters to
the loss function's keyword arguments; the losses themselves stay pure (``trainer.losses``).

The daemon reads this table (to validate its config) and must not import torch, so
``trainer.losses`` is imported on the first loss call, not with the table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from trainer import losses as L
else:

    class _Losses:
        """``trainer.losses``, imported on first use (it needs torch)."""

        def __getattr__(self, name: str) -> Any:
            return getattr(importlib.import_module("trainer.losses"), name)

    L = _Losses()


class PairLogps(NamedTuple):
    """A micro-batch of pairs, every field ``(B,)``: summed response log-probs and lengths."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    reference_chosen: Tensor
    reference_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor

    @property
    def four(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (
            self.policy_chosen,
            self.policy_rejected,
            self.reference_chosen,
            self.reference_rejected,
        )


class LossSettings(Protocol):
    """The loss settings the adapters read (``trainer.spec.Hyperparameters`` has them all)."""

    @property
    def beta(self) -> float: ...
    @property
    def label_smoothing(self) -> float: ...
    @property
    def lambda_(self) -> float: ...
    @property
    def gamma(self) -> float: ...
    @property
    def desirable_weight(self) -> float: ...
    @property
    def undesirable_weight(self) -> float: ...


PairLossFn = Callable[[PairLogps, LossSettings], "L.PairLoss"]
# (policy_logps, reference_logps, desirable, kl_estimate, hyperparameters)
UnpairedLossFn = Callable[["Tensor", "Tensor", "Tensor", "Tensor", LossSettings], "L.UnpairedLoss"]


@dataclass(frozen=True)
class Method:
    """What the trainer, the daemon and the docs need to know about one method."""

    name: str
    summary: str  # the reference's words: what it is, and the paper
    paired: bool  # (prompt, chosen, rejected) rows; else (prompt, completion, desirable)
    needs_reference: bool  # False: the reference model is never run (SimPO, ORPO)
    log2_at_init: bool  # loss is exactly log 2 when policy == reference (step-0 check)
    nll_term: bool  # adds ``hyper.rpo_alpha`` × NLL of the chosen reply
    self_normalized: bool  # the loss divides by length itself; ``length_normalize`` is moot
    kl_baseline: bool = False  # KTO's z0: a detached KL estimate from mismatched pairs
    pair_loss: PairLossFn | None = None
    unpaired_loss: UnpairedLossFn | None = None


# The adapters call the losses through the module (``L.dpo_loss``), so a test can swap one.
def _dpo(x: PairLogps, hp: LossSettings) -> L.PairLoss:
    return L.dpo_loss(*x.four, beta=hp.beta, label_smoothing=hp.label_smoothing)


def _robust(x: PairLogps, hp: LossSettings) -> L.PairLoss:
    return L.robust_dpo_loss(*x.four, beta=hp.beta, label_smoothing=hp.label_smoothing)


def _ipo(x: PairLogps, hp: LossSettings) -> L.PairLoss:
    return L.ipo_loss(*x.four, x.chosen_lengths, x.rejected_lengths, beta=hp.beta)


def _hinge(x: PairLogps, hp: LossSettings) -> L.PairLoss:
    return L.hinge_loss(*x.four, beta=hp.beta)


def _dpop(x: PairLogps, hp: LossSettings) -> L.PairLoss:
    return L.dpop_loss(*x.four, beta=hp.beta, lambda_=hp.lambda_)


def _simpo(x: PairLogps, hp: LossSettings) -> L.PairLoss:
    return L.simpo_loss(
        x.policy_chosen,
        x.policy_rejected,
        x.chosen_lengths,
        x.rejected_lengths,
        beta=hp.beta,
        gamma=hp.gamma,
    )


def _orpo(x: PairLogps, hp: LossSettings) -> L.PairLoss:
    return L.orpo_loss(
        x.policy_chosen, x.policy_rejected, x.chosen_lengths, x.rejected_lengths, beta=hp.beta
    )


def _kto(
    logps: Tensor, reference: Tensor, desirable: Tensor, kl: Tensor, hp: LossSettings
) -> L.UnpairedLoss:
    return L.kto_loss(
        logps,
        reference,
        desirable,
        kl,
        beta=hp.beta,
        desirable_weight=hp.desirable_weight,
        undesirable_weight=hp.undesirable_weight,
    )


def _apo_zero(
    logps: Tensor, reference: Tensor, desirable: Tensor, kl: Tensor, hp: LossSettings
) -> L.UnpairedLoss:
    return L.apo_zero_loss(logps, reference, desirable, beta=hp.beta)


def _paired(
    name: str,
    summary: str,
    loss: PairLossFn,
    *,
    needs_reference: bool = True,
    log2_at_init: bool = False,
    nll_term: bool = False,
    self_normalized: bool = False,
) -> Method:
    return Method(
        name,
        summary,
        paired=True,
        needs_reference=needs_reference,
        log2_at_init=log2_at_init,
        nll_term=nll_term,
        self_normalized=self_normalized,
        pair_loss=loss,
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _paired("dpo", "Rafailov et al. 2023", _dpo, log2_at_init=True),
        _paired("cdpo", "conservative DPO, label smoothing", _dpo, log2_at_init=True),
        _paired("robust", "Chowdhury et al. 2024", _robust, log2_at_init=True),
        _paired("ipo", "Azar et al. 2023", _ipo, self_normalized=True),
        _paired("hinge", "SLiC", _hinge),
        _paired("dpop", "DPO-Positive, Pal et al. 2024", _dpop, log2_at_init=True),
        _paired("rpo", "DPO + NLL on chosen", _dpo, log2_at_init=True, nll_term=True),
        _paired(
            "simpo",
            "Meng et al. 2024, reference-free",
            _simpo,
            needs_reference=False,
            self_normalized=True,
        ),
        _paired(
            "orpo",
            "Hong et al. 2024, reference-free",
            _orpo,
            needs_reference=False,
            self_normalized=True,
            nll_term=True,
        ),
        Method(
            "kto",
            "Ethayarajh et al. 2024",
            paired=False,
            needs_reference=True,
            log2_at_init=False,
            nll_term=False,
            self_normalized=False,
            kl_baseline=True,
            unpaired_loss=_kto,
        ),
        Method(
            "apo_zero",
            "D'Oosterlinck et al. 2024",
            paired=False,
            needs_reference=True,
            log2_at_init=False,
            nll_term=False,
            self_normalized=False,
            unpaired_loss=_apo_zero,
        ),
    )
}
PAIRED_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.paired)


def method(name: str) -> Method:
    """The table entry; a :class:`ValueError` naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; one of: {', '.join(METHODS)}") from None


def check_method(name: str) -> str:
    """Validator for a method name field (run spec, CLI)."""
    method(name)
    return name


def check_paired_method(name: str) -> str:
    """Validator for the daemon's ``training.pair_method``."""
    if not method(name).paired:
        raise ValueError(f"{name!r} is not a paired method; one of: {', '.join(PAIRED_METHODS)}")
    return name


def method_list() -> str:
    """docs/reference.md's method list (``python -m tools.docs``)."""
    return ", ".join(f"`{m.name}` ({m.summary})" for m in METHODS.values())
