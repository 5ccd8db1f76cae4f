"""Verifier-mined on-policy pairs: the model's own flagged replies as the rejected side.

The feedback's pairs are off-policy: the rejected side is the SFT draft, which apologises and
states almost nothing, so no pair shows a wrong amount next to the right one. Here the model
answers the *training* prompts itself (``samples`` replies each, sampled), the gate's own
detectors judge every reply — specifics the conversation does not hold
(``trainer.claims``), the policy rules that apply to the row's tags, empty/short/repetitive
text — and each flagged reply becomes a pair *the agent's reply ≻ the flagged reply*
(FactTune, arXiv 2311.08401; Trust-Align, arXiv 2409.11242: the model's own erroneous outputs
as negatives). The detectors are the verifier, so no reward model is involved.

Guards: only training rows are mined (the held-out split is never read, so evaluation stays
untouched); a row whose chosen reply is itself flagged is skipped (it would teach the fault);
at most ``max_per_prompt`` mined pairs per prompt; a sample equal to the chosen reply is never
a negative. Mined rows carry ``origin: "mined"`` and the flags that made them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trainer import verifier
from trainer.data import row_tags
from trainer.generation import generate
from trainer.logprobs import Prompt, as_messages
from trainer.spec import EvalSpec, GroundingSpec, MiningSpec, PolicyRule


def flags(
    reply: str,
    prompt: Prompt,
    tags: dict[str, str],
    grounding: GroundingSpec,
    rules: Sequence[PolicyRule],
) -> list[str]:
    """What the gate's detectors find wrong with ``reply`` to ``prompt`` (``trainer.verifier``)."""
    context = [m["content"] for m in as_messages(prompt)]
    return verifier.flags(reply, context, tags, grounding, rules)


@dataclass
class MiningReport:
    """What mining did, for ``result.json`` and the version manifest."""

    sampled: int = 0
    flagged: int = 0
    pairs: int = 0
    skipped_flagged_chosen: int = 0
    capped: int = 0
    by_flag: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sampled": self.sampled,
            "flagged": self.flagged,
            "pairs": self.pairs,
            "skipped_flagged_chosen": self.skipped_flagged_chosen,
            "capped": self.capped,
            "by_flag": dict(self.by_flag),
        }


def mine_pairs(
    rows: Sequence[dict[str, Any]],
    samples: Sequence[Sequence[str]],
    *,
    max_per_prompt: int,
    grounding: GroundingSpec,
    rules: Sequence[PolicyRule],
) -> tuple[list[dict[str, Any]], MiningReport]:
    """New pair rows from ``samples[i]``, the model's replies to ``rows[i]``'s prompt (training
    pair rows: ``prompt``, ``chosen``, ``tags``). Pure: the same inputs give the same rows."""
    report = MiningReport()
    mined: list[dict[str, Any]] = []
    per_prompt: Counter[str] = Counter()
    for row, replies in zip(rows, samples, strict=True):
        tags = row_tags(row)
        report.sampled += len(replies)
        if flags(row["chosen"], row["prompt"], tags, grounding, rules):
            report.skipped_flagged_chosen += 1
            continue
        key = json.dumps(row["prompt"], sort_keys=True)
        seen: set[str] = set()
        for reply in replies:
            found = flags(reply, row["prompt"], tags, grounding, rules)
            if not found or reply.strip() == row["chosen"].strip() or reply in seen:
                continue
            report.flagged += 1
            seen.add(reply)
            if per_prompt[key] >= max_per_prompt:
                report.capped += 1
                continue
            per_prompt[key] += 1
            report.by_flag.update({f.split(":")[0] for f in found})
            mined.append(
                {
                    "prompt": row["prompt"],
                    "chosen": row["chosen"],
                    "rejected": reply,
                    "tags": row.get("tags") or [],
                    "origin": "mined",
                    "flags": found,
                }
            )
    report.pairs = len(mined)
    return mined, report


def mine_model(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    spec: MiningSpec,
    evaluation: EvalSpec,
) -> tuple[list[dict[str, Any]], MiningReport]:
    """Sample ``spec.samples`` replies of the model (its trained adapter on) to each row's
    prompt and mine them with the evaluation's grounding and policy rules. On a sharded model
    every rank generates in lockstep and gets the same rows."""
    replies = generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        adapter="default",
        max_new_tokens=spec.max_new_tokens,
        batch_size=evaluation.generate_batch_size,
        samples=spec.samples,
        temperature=spec.temperature,
    )
    k = spec.samples
    return mine_pairs(
        rows,
        [replies[i * k : (i + 1) * k] for i in range(len(rows))],
        max_per_prompt=spec.max_per_prompt,
        grounding=evaluation.grounding,
        rules=evaluation.policy_rules,
    )
