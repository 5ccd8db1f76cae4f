"""The gate's detectors as a verifier of one reply: pure, no model, so the daemon can run them
on the drafts production events carry (a canary's served replies) as the trainer runs them on a
model's samples (:mod:`trainer.mining`) and its greedy held-out replies (:mod:`trainer.generation`).

A reply is flagged for each specific it states that its conversation does not hold
(:mod:`trainer.claims`), for each policy rule that applies to its tags and that it breaks, and
once when it is degenerate (fewer than ``SHORT_WORDS`` words, or mostly repeating itself).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from trainer.claims import unsupported_claims
from trainer.spec import GroundingSpec, PolicyRule

WORD = re.compile(r"\w+")
SHORT_WORDS = 5  # as the gate's degenerate check (trainer.generation.generation_stats)


def is_repetitive(text: str) -> bool:
    """A reply that mostly repeats itself: fewer than 40% distinct 3-grams over ≥ 12 words."""
    words = WORD.findall(text.lower())
    if len(words) < 12:
        return False
    grams = list(zip(words, words[1:], words[2:], strict=False))
    return len(set(grams)) / len(grams) < 0.4


def flags(
    reply: str,
    context: Sequence[str],
    tags: dict[str, str],
    grounding: GroundingSpec,
    rules: Sequence[PolicyRule],
) -> list[str]:
    """What the gate's detectors find wrong with ``reply`` to a conversation whose messages are
    ``context``: ``unsupported: <text>``, ``policy: <rule>: <violation>``, ``degenerate``;
    empty when nothing."""
    found = [
        f"unsupported: {c.text}"
        for c in unsupported_claims(reply, context, grounding.entities, grounding.ignore)
    ]
    found += [
        f"policy: {rule.name}: {v}"
        for rule in rules
        if rule.applies(tags)
        for v in rule.violations(reply)
    ]
    if len(WORD.findall(reply)) < SHORT_WORDS or is_repetitive(reply):
        found.append("degenerate")
    return found
