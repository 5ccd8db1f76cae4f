"""Evaluating an adapter against the frozen reference on held-out data.

Everything here runs under ``torch.no_grad()`` in eval mode, for one adapter name of a
``PeftModel`` at a time (``None`` = the reference, i.e. the SFT base). Reference log-probs
are computed once per eval set and reused for every adapter compared on it.

Reports (all plain floats, ready for ``result.json`` and the gate):
- preference: implicit-reward accuracy and margin (Rafailov et al. 2023, §5), and
  likelihood-ranking accuracy (mean per-token log-prob of chosen > rejected), which is also
  defined for the reference;
- KL(adapter ‖ reference): teacher-forced, exact over the vocabulary, per response token;
- factuality: multiple-choice accuracy, the choice with the highest mean log-prob;
- generation: greedy replies to held-out prompts and their degeneracy statistics.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.data import PairRow
from trainer.logprobs import (
    Encoded,
    Prompt,
    as_messages,
    collate,
    encode,
    render_prompt,
    response_logits,
)
from trainer.model import using_adapter
from trainer.packing import sequence_logps_shared_prefix


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def score(
    model: Any,
    examples: Sequence[Encoded],
    *,
    adapter: str | None,
    pad_id: int,
    batch_size: int = 8,
    progress: str | None = None,
) -> Tensor:
    """Summed response log-probs of ``examples`` under ``adapter`` (None = reference), ``(M,)``."""
    was_training = model.training
    model.eval()
    with using_adapter(model, adapter):
        logps = sequence_logps_shared_prefix(model, examples, pad_id, batch_size, progress=progress)
    model.train(was_training)
    return logps


@dataclass
class PairEvalSet:
    """Held-out pairs, tokenised once, with their reference log-probs computed once."""

    chosen: list[Encoded]
    rejected: list[Encoded]
    reference_chosen_logps: Tensor
    reference_rejected_logps: Tensor

    @property
    def chosen_lengths(self) -> Tensor:
        return torch.tensor([len(e.response_ids) for e in self.chosen], dtype=torch.float32)

    @property
    def rejected_lengths(self) -> Tensor:
        return torch.tensor([len(e.response_ids) for e in self.rejected], dtype=torch.float32)


def build_pair_eval_set(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PairRow],
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int,
) -> PairEvalSet:
    chosen = [
        encode(
            tokenizer,
            p.prompt,
            p.chosen,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for p in pairs
    ]
    rejected = [
        encode(
            tokenizer,
            p.prompt,
            p.rejected,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for p in pairs
    ]
    pad = tokenizer.pad_token_id
    return PairEvalSet(
        chosen,
        rejected,
        score(model, chosen, adapter=None, pad_id=pad, batch_size=batch_size),
        score(model, rejected, adapter=None, pad_id=pad, batch_size=batch_size),
    )


def preference_metrics(
    model: Any,
    evalset: PairEvalSet,
    *,
    adapter: str | None,
    beta: float,
    pad_id: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """Held-out preference metrics of ``adapter`` (or of the reference when None)."""
    if adapter is None:
        chosen, rejected = evalset.reference_chosen_logps, evalset.reference_rejected_logps
    else:
        chosen = score(model, evalset.chosen, adapter=adapter, pad_id=pad_id, batch_size=batch_size)
        rejected = score(
            model, evalset.rejected, adapter=adapter, pad_id=pad_id, batch_size=batch_size
        )
    chosen_pt = chosen / evalset.chosen_lengths
    rejected_pt = rejected / evalset.rejected_lengths
    report = {
        "num_pairs": float(len(evalset.chosen)),
        "ranking_accuracy": float((chosen_pt > rejected_pt).float().mean()),
        "chosen_logps_per_token": float(chosen_pt.mean()),
        "rejected_logps_per_token": float(rejected_pt.mean()),
        "chosen_logps": float(chosen.mean()),
    }
    if adapter is not None:
        chosen_rewards = beta * (chosen - evalset.reference_chosen_logps)
        rejected_rewards = beta * (rejected - evalset.reference_rejected_logps)
        margins = chosen_rewards - rejected_rewards
        report |= {
            "reward_accuracy": float((margins > 0).float().mean()),
            "reward_margin": float(margins.mean()),
            "chosen_rewards": float(chosen_rewards.mean()),
            "rejected_rewards": float(rejected_rewards.mean()),
        }
    return report


@torch.no_grad()
def kl_to_reference(
    model: Any, examples: Sequence[Encoded], *, adapter: str, pad_id: int, batch_size: int = 8
) -> float:
    """Mean per-token KL(adapter ‖ reference) on teacher-forced responses, in nats.

    Exact over the vocabulary at every response position: Σ_v p_a(v) (log p_a(v) − log p_ref(v)).
    """
    if not examples:
        return 0.0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for chunk in _chunks(examples, batch_size):
        batch = collate(chunk, pad_id, device)
        with using_adapter(model, adapter):
            adapter_logp = F.log_softmax(response_logits(model, batch), dim=-1)
        with using_adapter(model, None):
            reference_logp = F.log_softmax(response_logits(model, batch), dim=-1)
        kl = (adapter_logp.exp() * (adapter_logp - reference_logp)).sum(-1)
        total += float(kl.sum())
        tokens += int(kl.numel())
    model.train(was_training)
    return total / max(tokens, 1)


def load_factuality_set(name: str | None) -> list[dict[str, Any]]:
    """``'default'`` is the shipped general-knowledge set; otherwise a JSONL path."""
    if name is None:
        return []
    if name == "default":
        text = (Path(__file__).parent / "data" / "factuality.jsonl").read_text()
    else:
        text = Path(name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


NEUTRAL_PROMPT = "Answer:"


def factuality(
    model: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    *,
    adapter: str | None,
    batch_size: int = 16,
) -> float:
    """Multiple-choice accuracy over ``{question, choices, answer}`` items (``answer`` = index).

    Each choice is scored as the model's reply to the question, calibrated by its log-prob as
    a reply to a content-free prompt: log p(choice | question) − log p(choice | "Answer:")
    (PMI_DC, Holtzman et al. 2021, §3). Raw likelihood mostly rewards short, common answers;
    measured on the shipped set with SmolLM2-135M-Instruct: 36% (mean log-prob), 44% (summed),
    50% (calibrated), chance 25%.
    """
    if not questions:
        return float("nan")
    pairs = [(q["question"], str(c)) for q in questions for c in q["choices"]]
    pad = tokenizer.pad_token_id
    conditional = score(
        model,
        [encode(tokenizer, q, c) for q, c in pairs],
        adapter=adapter,
        pad_id=pad,
        batch_size=batch_size,
    )
    neutral = score(
        model,
        [encode(tokenizer, NEUTRAL_PROMPT, c) for _, c in pairs],
        adapter=adapter,
        pad_id=pad,
        batch_size=batch_size,
    )
    calibrated = conditional - neutral
    correct, i = 0, 0
    for q in questions:
        n = len(q["choices"])
        correct += int(int(calibrated[i : i + n].argmax()) == int(q["answer"]))
        i += n
    return correct / len(questions)


_WORD = re.compile(r"\w+")


def is_repetitive(text: str) -> bool:
    """A reply that mostly repeats itself: fewer than 40% distinct 3-grams over ≥ 12 words."""
    words = _WORD.findall(text.lower())
    if len(words) < 12:
        return False
    grams = list(zip(words, words[1:], words[2:], strict=False))
    return len(set(grams)) / len(grams) < 0.4


# fmt: off
_STOP = frozenset((
    "about", "after", "again", "also", "because", "before", "being", "could", "would", "should",
    "their", "there", "these", "those", "thanks", "thank", "please", "hello", "which", "while",
    "where", "what", "when", "with", "your", "yours", "have", "from", "this", "that", "just",
    "some", "will", "into", "them", "they", "been", "were",
))
# fmt: on


def _salient(text: str) -> set[str]:
    """Words a relevant reply would echo: numbers (order ids) and longer content words."""
    words = _WORD.findall(text.lower())
    return {w for w in words if (w.isdigit() and len(w) >= 3) or (len(w) >= 5 and w not in _STOP)}


def is_relevant(prompt: Prompt, reply: str) -> bool:
    """Does the reply mention something specific from the user's last message?"""
    messages = as_messages(prompt)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    wanted = _salient(last_user)
    return bool(wanted & _salient(reply)) if wanted else True


def generation_stats(
    replies: Sequence[str], prompts: Sequence[Prompt] | None = None, *, short_words: int = 5
) -> dict[str, float]:
    """Degeneracy statistics of a set of replies to *different* prompts.

    ``relevance_rate`` (with ``prompts``): share of replies that echo a number or content word
    of the request — "I'm here to assist you." to every customer scores 0.
    """
    if not replies:
        return {}
    words = [len(_WORD.findall(r)) for r in replies]
    n = len(replies)
    relevance = (
        {
            "relevance_rate": sum(is_relevant(p, r) for p, r in zip(prompts, replies, strict=True))
            / n
        }
        if prompts is not None
        else {}
    )
    return relevance | {
        "num_replies": float(n),
        "median_words": float(statistics.median(words)),
        "mean_words": float(statistics.fmean(words)),
        "empty_rate": sum(w == 0 for w in words) / n,
        "short_rate": sum(w < short_words for w in words) / n,
        "repetitive_rate": sum(is_repetitive(r) for r in replies) / n,
        "distinct_rate": len({r.strip().lower() for r in replies}) / n,
    }


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    adapter: str | None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
) -> list[str]:
    """Greedy replies (left-padded batches), as the served model would answer."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies: list[str] = []
    try:
        with using_adapter(model, adapter):
            for chunk in _chunks(prompts, batch_size):
                texts = [render_prompt(tokenizer, p) for p in chunk]
                inputs = tokenizer(
                    texts, return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                replies.extend(
                    t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                )
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies
