"""Greedy replies, as the served model would give them, and their degeneracy statistics.

Why the statistics exist (docs/ARCHITECTURE.md, "Why the gate looks at replies"): preference
accuracy and training loss say nothing about collapse; a reply can be short, polite and useless.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from trainer.claims import states_fact, unsupported_claims
from trainer.logprobs import Prompt, as_messages, render_prompt
from trainer.model import evaluating, using_adapter
from trainer.results import GenerationReport
from trainer.spec import GroundingSpec, PolicyRule
from trainer.verifier import WORD, is_repetitive

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
    words = WORD.findall(text.lower())
    return {w for w in words if (w.isdigit() and len(w) >= 3) or (len(w) >= 5 and w not in _STOP)}


def is_relevant(prompt: Prompt, reply: str) -> bool:
    """Does the reply mention something specific from the user's last message?"""
    messages = as_messages(prompt)
    last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    wanted = _salient(last_user)
    return bool(wanted & _salient(reply)) if wanted else True


def _grounding(
    replies: Sequence[str],
    prompts: Sequence[Prompt],
    tags: Sequence[dict[str, str]],
    grounding: GroundingSpec,
    rules: Sequence[PolicyRule],
) -> dict[str, Any]:
    """Unsupported claims, expected facts and policy rules, per reply and as rates."""
    unsupported: list[list[str]] = []
    violations: list[list[str]] = []
    grounded: list[bool] = []
    ruled: list[bool] = []
    for prompt, reply, tag in zip(prompts, replies, tags, strict=True):
        context = [m["content"] for m in as_messages(prompt)]
        claims = unsupported_claims(reply, context, grounding.entities, grounding.ignore)
        unsupported.append([c.text for c in claims])
        facts = [f.strip() for f in tag.get(grounding.facts_tag, "").split("|") if f.strip()]
        if facts:
            grounded.append(all(states_fact(reply, f, grounding.entities) for f in facts))
        applying = [rule for rule in rules if rule.applies(tag)]
        broken = [f"{rule.name}: {v}" for rule in applying for v in rule.violations(reply)]
        violations.append(broken)
        if applying:
            ruled.append(not broken)
    n = len(replies)
    return {
        "unsupported_rate": sum(bool(u) for u in unsupported) / n,
        "grounded_rate": sum(grounded) / len(grounded) if grounded else None,
        "grounded_replies": len(grounded),
        "policy_compliance": sum(ruled) / len(ruled) if ruled else None,
        "policy_replies": len(ruled),
        "policy_rules": [rule.name for rule in rules],
        "unsupported": unsupported,
        "violations": violations,
    }


def generation_stats(
    replies: Sequence[str],
    prompts: Sequence[Prompt],
    *,
    tags: Sequence[dict[str, str]] | None = None,
    grounding: GroundingSpec | None = None,
    policy_rules: Sequence[PolicyRule] = (),
    short_words: int = 5,
) -> GenerationReport:
    """The replies to *different* prompts, with their degeneracy and grounding statistics.

    ``relevance_rate``: share of replies that echo a number or content word of the request —
    "I'm here to assist you." to every customer scores 0. ``unsupported_rate``: share of
    replies that state a specific (amount, date, ID, …) found nowhere in the conversation
    (``trainer.claims``); ``grounded_rate``: of the prompts whose tags list expected facts, the
    share of replies that state all of them; ``policy_compliance``: of the prompts a policy rule
    applies to (by tag), the share of replies that break none.
    """
    tags = list(tags) if tags is not None else [{} for _ in prompts]
    if not replies:
        return GenerationReport(prompts=list(prompts), tags=tags)
    words = [len(WORD.findall(r)) for r in replies]
    n = len(replies)
    return GenerationReport(
        **_grounding(replies, prompts, tags, grounding or GroundingSpec(), policy_rules),
        tags=tags,
        num_replies=n,
        median_words=float(statistics.median(words)),
        mean_words=float(statistics.fmean(words)),
        empty_rate=sum(w == 0 for w in words) / n,
        short_rate=sum(w < short_words for w in words) / n,
        repetitive_rate=sum(is_repetitive(r) for r in replies) / n,
        distinct_rate=len({r.strip().lower() for r in replies}) / n,
        relevance_rate=sum(is_relevant(p, r) for p, r in zip(prompts, replies, strict=True)) / n,
        prompts=list(prompts),
        replies=list(replies),
    )


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    adapter: str | None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    samples: int = 1,
    temperature: float = 0.0,
) -> list[str]:
    """Greedy replies (left-padded batches), as the served model would answer; with
    ``temperature`` > 0, ``samples`` sampled replies per prompt instead (prompt-major order:
    prompt 0's samples first), seeded by the caller's torch seed."""
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    replies: list[str] = []
    try:
        with evaluating(model), using_adapter(model, adapter):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                texts = [render_prompt(tokenizer, p) for p in chunk]
                inputs = tokenizer(
                    texts, return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                output = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    **({"temperature": temperature, "top_k": 0} if temperature > 0 else {}),
                    num_return_sequences=samples if temperature > 0 else 1,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                replies.extend(
                    t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                )
    finally:
        tokenizer.padding_side = side
    return replies
