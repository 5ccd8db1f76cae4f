"""What one micro-batch costs: tokenised rows, their reference log-probs, and the method's loss.

Three steps, in the order the recipe (``trainer.train``) runs them:

1. :func:`encode_rows` tokenises every training row once (no model involved);
2. the recipe computes the reference log-probs of :meth:`reference_inputs` — through the
   cross-run cache, so a refresh scores only rows it has not seen — as tensors;
3. :class:`PairedObjective` / :class:`UnpairedObjective` are built from both and asked, per
   micro-batch of example indices, for the per-example losses, the statistics to log and the
   tokens processed. The training loop stays the same for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainer import losses as L
from trainer.data import to_pairs, to_unpaired
from trainer.logprobs import Encoded, collate, encode, sequence_logps
from trainer.methods import Method, PairLogps
from trainer.packing import pack_pairs, pair_logps
from trainer.spec import Hyperparameters

Stats = dict[str, Tensor]


def _encode_all(tokenizer: Any, items: list[tuple[Any, str]], hp: Hyperparameters) -> list[Encoded]:
    return [
        encode(tokenizer, p, r, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length)
        for p, r in items
    ]


@dataclass(frozen=True)
class PairedRows:
    """(prompt, chosen, rejected) rows, tokenised."""

    chosen: list[Encoded]
    rejected: list[Encoded]

    def reference_inputs(self, method: Method) -> dict[str, list[Encoded]]:
        """What needs reference log-probs, by name (nothing for reference-free methods)."""
        return {"chosen": self.chosen, "rejected": self.rejected} if method.needs_reference else {}


@dataclass(frozen=True)
class UnpairedRows:
    """(prompt, completion, desirable) rows, tokenised, and KTO's mismatched pairs."""

    examples: list[Encoded]
    desirable: Tensor  # (N,) bool
    # KTO's KL estimate z0 pairs each prompt with another row's completion (mismatched); the
    # pairing is fixed per dataset so its reference terms are computed once.
    kl_examples: list[Encoded]

    def reference_inputs(self, method: Method) -> dict[str, list[Encoded]]:
        inputs = {"examples": self.examples}
        if method.kl_baseline:
            inputs["kl_examples"] = self.kl_examples
        return inputs


def encode_rows(
    method: Method, rows: list[dict[str, Any]], tokenizer: Any, hp: Hyperparameters
) -> PairedRows | UnpairedRows:
    if method.paired:
        pairs = to_pairs(rows)
        return PairedRows(
            _encode_all(tokenizer, [(p.prompt, p.chosen) for p in pairs], hp),
            _encode_all(tokenizer, [(p.prompt, p.rejected) for p in pairs], hp),
        )
    unpaired = to_unpaired(rows)
    n = len(unpaired)
    return UnpairedRows(
        _encode_all(tokenizer, [(u.prompt, u.completion) for u in unpaired], hp),
        torch.tensor([u.desirable for u in unpaired]),
        _encode_all(
            tokenizer,
            [(u.prompt, unpaired[(i + 1) % n].completion) for i, u in enumerate(unpaired)],
            hp,
        ),
    )


def preference_loss(method: Method, hp: Hyperparameters, x: PairLogps) -> tuple[L.PairLoss, Tensor]:
    """The paired loss of ``method`` and its total per-example loss (with any NLL term)."""
    raw_chosen = x.policy_chosen
    if hp.length_normalize and not method.self_normalized:
        x = x._replace(
            policy_chosen=L.per_token(x.policy_chosen, x.chosen_lengths),
            policy_rejected=L.per_token(x.policy_rejected, x.rejected_lengths),
            reference_chosen=L.per_token(x.reference_chosen, x.chosen_lengths),
            reference_rejected=L.per_token(x.reference_rejected, x.rejected_lengths),
        )
    assert method.pair_loss is not None, f"{method.name} is not a paired method"
    out = method.pair_loss(x, hp)
    total = out.losses
    if method.nll_term:
        total = total + hp.rpo_alpha * L.nll_loss(raw_chosen, x.chosen_lengths)
    return out, total


class PairedObjective:
    """DPO-family losses over (prompt, chosen, rejected) rows."""

    def __init__(
        self,
        method: Method,
        hp: Hyperparameters,
        rows: PairedRows,
        reference: dict[str, Tensor],
        pad_id: int,
    ) -> None:
        self.method, self.hp, self.pad_id, self.rows = method, hp, pad_id, rows
        self.num_examples = n = len(rows.chosen)
        # a supervised pass (``hyper.sft_epochs``): the loss is the chosen reply's NLL alone;
        # the preference statistics are still logged, so every detector reads the same metrics
        self.supervised_only = False
        # Reference-free methods never look at these; zeros keep the statistics defined.
        self.reference_chosen = reference.get("chosen", torch.zeros(n))
        self.reference_rejected = reference.get("rejected", torch.zeros(n))

    def micro_batch(
        self, model: Any, idx: list[int], device: torch.device
    ) -> tuple[Tensor, Stats, int]:
        # Chosen and rejected in one forward, their shared start (prompt, common opening) once.
        pack = pack_pairs(
            [self.rows.chosen[i] for i in idx],
            [self.rows.rejected[i] for i in idx],
            self.pad_id,
            device,
            row_tokens=self.hp.pack_tokens,
        )
        pc, pr = pair_logps(model, pack)
        lc, lr = pack.chosen_lengths.float(), pack.rejected_lengths.float()
        rc, rr = self.reference_chosen[idx].to(device), self.reference_rejected[idx].to(device)
        out, total = preference_loss(self.method, self.hp, PairLogps(pc, pr, rc, rr, lc, lr))
        if self.supervised_only:
            total = L.nll_loss(pc, lc)
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
        method: Method,
        hp: Hyperparameters,
        rows: UnpairedRows,
        reference: dict[str, Tensor],
        pad_id: int,
        sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.method, self.hp, self.pad_id, self.rows = method, hp, pad_id, rows
        # KTO's baseline z0 is the mean over the *global* micro-batch (as TRL gathers it across
        # processes): each rank contributes its rows' sum and count
        self.sum_across_ranks = sum_across_ranks or (lambda t: t)
        self.num_examples = n = len(rows.examples)
        self.reference = reference["examples"]
        self.kl_reference = reference.get("kl_examples", torch.zeros(n))

    def _kl_estimate(self, model: Any, idx: list[int], device: torch.device) -> Tensor:
        if not self.method.kl_baseline:
            return torch.zeros((), device=device)
        with torch.no_grad():  # z0 is a detached baseline (KTO paper §4.1)
            batch = collate([self.rows.kl_examples[i] for i in idx], self.pad_id, device)
            shifted = sequence_logps(model, batch) - self.kl_reference[idx].to(device)
            count = torch.tensor(float(shifted.numel()), device=device, dtype=shifted.dtype)
            total = self.sum_across_ranks(torch.stack([shifted.sum(), count]))
        return (total[0] / total[1]).clamp(min=0)

    def micro_batch(
        self, model: Any, idx: list[int], device: torch.device
    ) -> tuple[Tensor, Stats, int]:
        batch = collate([self.rows.examples[i] for i in idx], self.pad_id, device)
        desirable = self.rows.desirable[idx].to(device)
        logps = sequence_logps(model, batch)
        ref = self.reference[idx].to(device)
        kl_estimate = self._kl_estimate(model, idx, device)
        assert self.method.unpaired_loss is not None, f"{self.method.name} is a paired method"
        out = self.method.unpaired_loss(logps, ref, desirable, kl_estimate, self.hp)
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


Objective = PairedObjective | UnpairedObjective


def make_objective(
    method: Method,
    hp: Hyperparameters,
    rows: PairedRows | UnpairedRows,
    reference: dict[str, Tensor],
    pad_id: int,
    sum_across_ranks: Callable[[Tensor], Tensor] | None = None,
) -> PairedObjective | UnpairedObjective:
    if isinstance(rows, PairedRows):
        return PairedObjective(method, hp, rows, reference, pad_id)
    return UnpairedObjective(method, hp, rows, reference, pad_id, sum_across_ranks)
