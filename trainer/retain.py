"""The retain set: general prompts unrelated to the feedback, where no change is intended.

Drift is measured there, not on the feedback's own text. The KL on held-out *chosen* replies
reads the requested change as drift (the required policy sentence alone cost 0.51 nats/token),
while forgetting is predicted by the KL to the old model on what it already did well
(Shenfeld et al., "RL's Razor", arXiv 2509.04259; HALVA, arXiv 2405.18654, budgets a
full-vocabulary KL on a separate retain set). So:

- the reference (SFT model) answers each retain prompt greedily, once per base model (the replies
  are cached as JSON beside the reference log-prob cache);
- drift = KL(reference ‖ adapter), exact over the vocabulary, summed over each reply's tokens,
  averaged over the replies, with a 95% interval: :func:`drift_report`;
- training can anchor on a second, disjoint set (:class:`AnchorBatches`): α · KL(reference ‖
  policy) on a few retain replies per step, against the reference's top-k distributions
  computed once per run (a tail bucket keeps the rest of the mass, so the term is a lower bound
  of the exact KL that reaches it when the tail is small; ``tests/trainer/test_retain.py``
  measures the gap).

The shipped sets are ``data/retain_eval.jsonl`` (the gate and the drift probe) and
``data/retain_train.jsonl`` (the anchor): the gate never measures the prompts the anchor trained
on. The two are the even and odd lines of one list of 126 prompts (geography, arithmetic,
definitions, short poems, advice), so they are alike without being the same.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.evalcache import greedy_replies
from trainer.logprobs import Encoded, Prompt, collate, encode, response_logits
from trainer.model import evaluating, using_adapter
from trainer.results import DriftReport
from trainer.spec import AnchorSpec

DATA = Path(__file__).parent / "data"
SHIPPED = {"eval": DATA / "retain_eval.jsonl", "train": DATA / "retain_train.jsonl"}


def load_prompts(name: str, *, shipped: str) -> list[Prompt]:
    """``'default'`` is the shipped set ``shipped`` ('eval' or 'train'); otherwise a JSONL path
    of ``{"prompt": str | messages}`` rows."""
    path = SHIPPED[shipped] if name == "default" else Path(name)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["prompt"] for row in rows]


def encode_replies(
    tokenizer: Any, prompts: Sequence[Prompt], replies: Sequence[str]
) -> list[Encoded]:
    return [encode(tokenizer, p, r) for p, r in zip(prompts, replies, strict=True)]


@torch.no_grad()
def kl_per_reply(
    model: Any,
    examples: Sequence[Encoded],
    *,
    adapter: str | None,
    pad_id: int,
    batch_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """KL(reference ‖ ``adapter``) summed over each reply's tokens, ``(M,)`` nats, and the
    replies' token counts ``(M,)``. Exact: Σ_t Σ_v p_ref(v) (log p_ref(v) − log p_a(v))."""
    device = next(model.parameters()).device
    sums, lengths = [], []
    with evaluating(model):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id, device)
            with using_adapter(model, None):
                reference = F.log_softmax(response_logits(model, batch), dim=-1)
            with using_adapter(model, adapter):
                policy = F.log_softmax(response_logits(model, batch), dim=-1)
            per_token = (reference.exp() * (reference - policy)).sum(-1).clamp_min(0.0)
            out = torch.zeros(len(batch.lengths), dtype=torch.float64)
            sums.append(out.index_add(0, batch.rows.cpu(), per_token.double().cpu()))
            lengths.append(batch.lengths.cpu())
    if not sums:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(sums), torch.cat(lengths)


def drift_report(per_reply: Tensor, lengths: Tensor) -> DriftReport:
    """Mean nats per reply with its 95% interval (normal approximation, 1.96 · sd / √n)."""
    n = int(per_reply.numel())
    mean = float(per_reply.mean()) if n else 0.0
    sd = float(per_reply.std()) if n > 1 else 0.0
    return DriftReport(
        nats_per_reply=mean,
        ci95=1.96 * sd / math.sqrt(n) if n else 0.0,
        nats_per_token=float(per_reply.sum() / max(int(lengths.sum()), 1)),
        num_replies=n,
    )


@dataclass
class TopK:
    """The reference's distribution at each response position of one retain reply, kept as its
    ``k`` most likely tokens plus one tail bucket: ``indices``/``logps`` ``(T, k)``, ``tail``
    ``(T,)`` = log of the probability outside the top k."""

    indices: Tensor
    logps: Tensor
    tail: Tensor


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@torch.no_grad()
def reference_topk(
    model: Any, examples: Sequence[Encoded], *, k: int, pad_id: int, batch_size: int = 8
) -> list[TopK]:
    """One eval-mode reference pass over ``examples``; keeps 12·k + 4 bytes per response
    token (int64 ids, float32 log-probs, the tail)."""
    device = next(model.parameters()).device
    out: list[TopK] = []
    with evaluating(model), using_adapter(model, None):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id, device)
            logp = F.log_softmax(response_logits(model, batch), dim=-1)
            top, idx = logp.topk(k, dim=-1)
            tail = _log1mexp(torch.logsumexp(top, dim=-1))
            offset = 0
            for n in batch.lengths.tolist():
                sl = slice(offset, offset + n)
                out.append(TopK(idx[sl].cpu(), top[sl].cpu(), tail[sl].cpu()))
                offset += n
    return out


def topk_kl(policy_logits: Tensor, reference: TopK) -> Tensor:
    """KL(reference ‖ policy) per position ``(T,)`` over the top-k tokens and the tail bucket:
    Σ_{v∈top} p_r(v)(log p_r(v) − log p_π(v)) + p_r(tail)(log p_r(tail) − log p_π(tail)).
    Grouping the tail can only lower a KL (log-sum inequality), so this is ≤ the exact value."""
    logp = F.log_softmax(policy_logits.float(), dim=-1)
    policy_top = logp.gather(-1, reference.indices)
    policy_tail = _log1mexp(torch.logsumexp(policy_top, dim=-1))
    head = (reference.logps.exp() * (reference.logps - policy_top)).sum(-1)
    tail = reference.tail.exp() * (reference.tail - policy_tail)
    return head + tail


class AnchorBatches:
    """The retain anchor of a training run: cycles through the retain replies ``batch_size`` at
    a time and returns KL(reference ‖ policy) summed per reply, ``(B,)``, with gradients."""

    def __init__(
        self, examples: list[Encoded], reference: list[TopK], *, batch_size: int, pad_id: int
    ) -> None:
        self.examples, self.reference = examples, reference
        self.batch_size, self.pad_id = batch_size, pad_id
        self.position = 0

    @property
    def nbytes(self) -> int:
        return sum(
            t.indices.nelement() * t.indices.element_size()
            + t.logps.nelement() * t.logps.element_size()
            + t.tail.nelement() * t.tail.element_size()
            for t in self.reference
        )

    def next_indices(self) -> list[int]:
        n = len(self.examples)
        picked = [(self.position + i) % n for i in range(min(self.batch_size, n))]
        self.position = (self.position + len(picked)) % n
        return picked

    def kl(self, model: Any, device: torch.device) -> Tensor:
        picked = self.next_indices()
        batch = collate([self.examples[i] for i in picked], self.pad_id, device)
        logits = response_logits(model, batch)
        per_reply, offset = [], 0
        for i, n in zip(picked, batch.lengths.tolist(), strict=True):
            ref = self.reference[i]
            target = TopK(ref.indices.to(device), ref.logps.to(device), ref.tail.to(device))
            per_reply.append(topk_kl(logits[offset : offset + n], target).sum())
            offset += n
        return torch.stack(per_reply)


def build_anchor(
    model: Any,
    tokenizer: Any,
    spec: AnchorSpec,
    *,
    identity: str,
    batch_size: int,
    generate_batch_size: int,
    cache_dir: Path | None,
) -> AnchorBatches:
    """The retain anchor's data: the reference's replies to the training retain set (generated
    once per base, cached) and its top-k distributions on them (one forward per run)."""
    prompts = load_prompts(spec.prompts, shipped="train")
    replies = greedy_replies(
        model,
        tokenizer,
        prompts,
        adapter=None,
        identity=identity,
        max_new_tokens=spec.max_new_tokens,
        batch_size=generate_batch_size,
        cache_dir=cache_dir,
    )
    examples = encode_replies(tokenizer, prompts, replies)
    pad = tokenizer.pad_token_id
    top = reference_topk(model, examples, k=spec.top_k, pad_id=pad, batch_size=batch_size)
    return AnchorBatches(examples, top, batch_size=spec.batch_size, pad_id=pad)
