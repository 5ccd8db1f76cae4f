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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Findings:
    """What the detectors found in one reply."""

    unsupported: tuple[str, ...]  # the specifics stated that the conversation does not hold
    ruled: bool  # a policy rule applies to the reply's tags
    violations: tuple[str, ...]  # ``<rule>: <violation>``
    degenerate: bool

    def flags(self) -> list[str]:
        return (
            [f"unsupported: {u}" for u in self.unsupported]
            + [f"policy: {v}" for v in self.violations]
            + (["degenerate"] if self.degenerate else [])
        )


def check_reply(
    reply: str,
    context: Sequence[str],
    tags: dict[str, str],
    grounding: GroundingSpec,
    rules: Sequence[PolicyRule],
) -> Findings:
    """The detectors on ``reply`` to a conversation whose messages are ``context``."""
    applying = [rule for rule in rules if rule.applies(tags)]
    claims = unsupported_claims(reply, context, grounding.entities, grounding.ignore)
    return Findings(
        unsupported=tuple(c.text for c in claims),
        ruled=bool(applying),
        violations=tuple(f"{rule.name}: {v}" for rule in applying for v in rule.violations(reply)),
        degenerate=len(WORD.findall(reply)) < SHORT_WORDS or is_repetitive(reply),
    )


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
    return check_reply(reply, context, tags, grounding, rules).flags()
