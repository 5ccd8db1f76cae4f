"""What one micro-batch costs: tokenised data, reference log-probs, and the method's loss.

An objective is built once per run (tokenising every row and computing the reference
log-probs up front — they never change during a run) and then asked, for a list of example
indices, for the per-example losses, the statistics to log, and the tokens processed. The
training loop stays the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from trainer import losses as L
from trainer.data import to_pairs, to_unpaired
from trainer.logprobs import Encoded, collate, encode, sequence_logps
from trainer.packing import pack_pairs, pair_logps
from trainer.spec import REFERENCE_FREE, Hyperparameters

Stats = dict[str, Tensor]
ReferenceFn = Callable[[Any, list[Encoded], int, int], Tensor]


def preference_loss(
    method: str,
    hp: Hyperparameters,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> tuple[L.PairLoss, Tensor]:
    """The paired loss of ``method`` and its total per-example loss (with any NLL term)."""
    raw_chosen = policy_chosen
    if hp.length_normalize and method not in {"ipo", "simpo", "orpo"}:
        policy_chosen = L.per_token(policy_chosen, chosen_lengths)
        policy_rejected = L.per_token(policy_rejected, rejected_lengths)
        reference_chosen = L.per_token(reference_chosen, chosen_lengths)
        reference_rejected = L.per_token(reference_rejected, rejected_lengths)
    four = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    beta = hp.beta
    if method in {"dpo", "cdpo", "rpo"}:
        out = L.dpo_loss(*four, beta=beta, label_smoothing=hp.label_smoothing)
    elif method == "robust":
        out = L.robust_dpo_loss(*four, beta=beta, label_smoothing=hp.label_smoothing)
    elif method == "ipo":
        out = L.ipo_loss(*four, chosen_lengths, rejected_lengths, beta=beta)
    elif method == "hinge":
        out = L.hinge_loss(*four, beta=beta)
    elif method == "dpop":
        out = L.dpop_loss(*four, beta=beta, lambda_=hp.lambda_)
    elif method == "simpo":
        out = L.simpo_loss(
            policy_chosen,
            policy_rejected,
            chosen_lengths,
            rejected_lengths,
            beta=beta,
            gamma=hp.gamma,
        )
    elif method == "orpo":
        out = L.orpo_loss(
            policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, beta=beta
        )
    else:
        raise ValueError(f"not a paired method: {method}")
    total = out.losses
    if method in {"rpo", "orpo"}:
        total = total + hp.rpo_alpha * L.nll_loss(raw_chosen, chosen_lengths)
    return out, total


def _encode_all(tokenizer: Any, items: list[tuple[Any, str]], hp: Hyperparameters) -> list[Encoded]:
    return [
        encode(tokenizer, p, r, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length)
        for p, r in items
    ]


class PairedObjective:
    """DPO-family losses over (prompt, chosen, rejected) rows."""

    def __init__(
        self,
        method: str,
        hp: Hyperparameters,
        rows: list[dict[str, Any]],
        model: Any,
        tokenizer: Any,
        reference_logps: ReferenceFn,
        eval_batch_size: int,
    ) -> None:
        self.method, self.hp, self.pad_id = method, hp, tokenizer.pad_token_id
        pairs = to_pairs(rows)
        self.chosen = _encode_all(tokenizer, [(p.prompt, p.chosen) for p in pairs], hp)
        self.rejected = _encode_all(tokenizer, [(p.prompt, p.rejected) for p in pairs], hp)
        self.num_examples = len(pairs)
        if method in REFERENCE_FREE:
            self.reference_chosen = self.reference_rejected = torch.zeros(self.num_examples)
        else:
            self.reference_chosen = reference_logps(
                model, self.chosen, self.pad_id, eval_batch_size
            )
            self.reference_rejected = reference_logps(
                model, self.rejected, self.pad_id, eval_batch_size
            )

    def micro_batch(
        self, model: Any, idx: list[int], device: torch.device
    ) -> tuple[Tensor, Stats, int]:
        # Chosen and rejected in one forward, their shared start (prompt, common opening) once.
        pack = pack_pairs(
            [self.chosen[i] for i in idx],
            [self.rejected[i] for i in idx],
            self.pad_id,
            device,
            row_tokens=self.hp.pack_tokens,
        )
        pc, pr = pair_logps(model, pack)
        lc, lr = pack.chosen_lengths.float(), pack.rejected_lengths.float()
        rc, rr = self.reference_chosen[idx].to(device), self.reference_rejected[idx].to(device)
        out, total = preference_loss(self.method, self.hp, pc, pr, rc, rr, lc, lr)
        stats = {
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": pc.detach(),
            "logps/rejected": pr.detach(),
            "logps/chosen_per_token": (pc / lc).detach(),
            # From the log-probs, not the loss's outputs: the sign-bug detector reads this.
            "logratio_margin": ((pc - rc) - (pr - rr)).detach(),
            "kl_proxy": torch.cat([(pc - rc).abs() / lc, (pr - rr).abs() / lr]).detach(),
            "preference_loss": out.losses.detach(),
        }
        return total, stats, pack.logical_tokens


class UnpairedObjective:
    """KTO / APO-zero over (prompt, completion, desirable) rows."""

    def __init__(
        self,
        method: str,
        hp: Hyperparameters,
        rows: list[dict[str, Any]],
        model: Any,
        tokenizer: Any,
        reference_logps: ReferenceFn,
        eval_batch_size: int,
    ) -> None:
        self.method, self.hp, self.pad_id = method, hp, tokenizer.pad_token_id
        unpaired = to_unpaired(rows)
        n = self.num_examples = len(unpaired)
        self.examples = _encode_all(tokenizer, [(u.prompt, u.completion) for u in unpaired], hp)
        self.desirable = torch.tensor([u.desirable for u in unpaired])
        self.reference = reference_logps(model, self.examples, self.pad_id, eval_batch_size)
        # KTO's KL estimate z0 pairs each prompt with another row's completion (mismatched);
        # the pairing is fixed per dataset so its reference terms are computed once.
        self.kl_examples = _encode_all(
            tokenizer,
            [(u.prompt, unpaired[(i + 1) % n].completion) for i, u in enumerate(unpaired)],
            hp,
        )
        self.kl_reference = (
            reference_logps(model, self.kl_examples, self.pad_id, eval_batch_size)
            if method == "kto"
            else torch.zeros(n)
        )

    def _kl_estimate(self, model: Any, idx: list[int], device: torch.device) -> Tensor:
        if self.method != "kto":
            return torch.zeros((), device=device)
        with torch.no_grad():  # z0 is a detached baseline (KTO paper §4.1)
            batch = collate([self.kl_examples[i] for i in idx], self.pad_id, device)
            shifted = sequence_logps(model, batch) - self.kl_reference[idx].to(device)
        return shifted.mean().clamp(min=0)

    def micro_batch(
        self, model: Any, idx: list[int], device: torch.device
    ) -> tuple[Tensor, Stats, int]:
        batch = collate([self.examples[i] for i in idx], self.pad_id, device)
        desirable = self.desirable[idx].to(device)
        logps = sequence_logps(model, batch)
        ref = self.reference[idx].to(device)
        kl_estimate = self._kl_estimate(model, idx, device)
        hp = self.hp
        if self.method == "kto":
            out = L.kto_loss(
                logps,
                ref,
                desirable,
                kl_estimate,
                beta=hp.beta,
                desirable_weight=hp.desirable_weight,
                undesirable_weight=hp.undesirable_weight,
            )
        else:
            out = L.apo_zero_loss(logps, ref, desirable, beta=hp.beta)
        logratios = (logps - ref).detach()
        stats = {
            "rewards/chosen": out.rewards[desirable],
            "rewards/rejected": out.rewards[~desirable],
            "logps/chosen": logps.detach()[desirable],
            "logps/rejected": logps.detach()[~desirable],
            "logps/chosen_per_token": (logps.detach() / batch.lengths)[desirable],
            "logratio_desirable": logratios[desirable],
            "logratio_undesirable": logratios[~desirable],
            "kl_proxy": logratios.abs() / batch.lengths,
            "kl_estimate": kl_estimate.reshape(1),
        }
        return out.losses, stats, batch.num_tokens
