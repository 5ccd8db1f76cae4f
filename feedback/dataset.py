"""Events → DPO pairs and KTO examples: the rules, and the pure functions that apply them to
one event or one group of votes. :mod:`feedback.grouping` runs them over a whole store.

Rules (each filter is counted, so the manifest says what was dropped and why):

- ``edit`` → pair (chosen = edited reply, rejected = the model's reply);
- ``comparison`` → pair;
- ``rating`` → KTO example (desirable = up); an ``up`` and a ``down`` on the same prompt for
  different replies → also a *mined* pair (up = chosen);
- texts are compared, and prompts keyed for dedupe, caps and the held-out split, after
  :func:`normalize` (NFKC, case, zero-width and format characters, punctuation that does not
  sit between two letters or digits, whitespace): "Where is my order?" and "where is my
  order" are one prompt and land on one side of the split;
- ``trivial_edit``: chosen and rejected identical after normalisation. An ``edit`` whose agent
  sent the model's reply unchanged is an *accepted* reply: no pair, but a desirable KTO example
  (like a thumbs-up from the agent);
- ``length_ratio``: chosen more than k× longer (in words) than rejected — the length-bias
  guard of the DPO checklist: otherwise the cheapest way to win is to be long;
- votes are counted per *voter* (the event's actor, or the event itself when it names none):
  a voter's later vote on the same row replaces its earlier one (``duplicate_*``);
- ``duplicate_pair`` / ``duplicate_example``: the same row again, by the same or another voter
  on the same side (first one kept);
- ``outvoted_pair`` / ``outvoted_label``: A>B and B>A (or up and down on one reply) — the
  side with more distinct voters wins, the other side's rows are dropped and counted; one
  opposite vote does not erase fifty;
- ``contradictory_pair`` / ``contradictory_label``: a tie between the two sides — all dropped;
- ``actor_cap`` / ``prompt_cap``: rows beyond ``max_rows_per_actor`` from one actor, or
  ``max_rows_per_prompt`` for one prompt, per kind (the most recent are kept); events with no
  actor are not capped per actor (they have no identity) but count as one ``(unattributed)``
  actor in the manifest's shares;
- ``too_long``: a text over the character cap; ``outside_window``: older than the window.

Events are processed in (occurred_at, event_id) order, so the same events always give the
same rows in the same order, whatever order they were read in.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from feedback.events import ComparisonEvent, EditEvent, Event, RatingEvent

Messages = list[dict[str, str]]
FILTERS = (
    "trivial_edit",
    "length_ratio",
    "duplicate_pair",
    "duplicate_example",
    "outvoted_pair",
    "outvoted_label",
    "contradictory_pair",
    "contradictory_label",
    "actor_cap",
    "prompt_cap",
    "too_long",
    "outside_window",
)
UNATTRIBUTED = "(unattributed)"


@dataclass(frozen=True)
class PairExample:
    prompt: Messages
    chosen: str
    rejected: str
    source: str  # edit | comparison | mined
    event_ids: tuple[str, ...]
    prompt_sha256: str  # of the normalised prompt: the dedupe, cap and split key
    tags: dict[str, str] = field(default_factory=dict)
    actor: str = ""  # "kind:id" of the event's actor; "" when it names none

    @property
    def voter(self) -> str:
        return self.actor or f"event:{self.event_ids[0]}"


@dataclass(frozen=True)
class KTOExample:
    prompt: Messages
    completion: str
    label: bool  # True = desirable
    event_id: str
    prompt_sha256: str
    tags: dict[str, str] = field(default_factory=dict)
    actor: str = ""


# Characters that render as nothing: zero-width space/joiners, marks, soft hyphen, BOM,
# variation selectors, bidi controls. NFKC keeps them, so they are removed explicitly.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f"
    "\u202a-\u202e\u2060-\u206f\ufe00-\ufe0f\ufeff]"
)
# Punctuation that does not sit between two word characters ("ships today." but not "12.34").
_LOOSE_PUNCT = re.compile(r"[^\w\s]+(?!\w)|(?<!\w)[^\w\s]+")


def normalize(text: str) -> str:
    """The comparison form of a text: NFKC, casefolded, invisible characters and loose
    punctuation removed, whitespace collapsed."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold()
    return " ".join(_LOOSE_PUNCT.sub(" ", text).split())


def prompt_id(event: Event) -> str:
    """A stable hash of the normalised prompt (roles and normalised contents)."""
    payload = json.dumps([[m.role, normalize(m.content)] for m in event.prompt])
    return hashlib.sha256(payload.encode()).hexdigest()


def actor_of(event: Event) -> str:
    return f"{event.actor.kind}:{event.actor.id}" if event.actor else ""


def voter(event: Event) -> str:
    return actor_of(event) or f"event:{event.event_id}"


def words(text: str) -> int:
    return len(text.split())


def messages(event: Event) -> Messages:
    return [{"role": m.role, "content": m.content} for m in event.prompt]


def texts(event: Event) -> list[str]:
    texts = [m.content for m in event.prompt]
    if isinstance(event, RatingEvent):
        texts.append(event.completion)
    elif isinstance(event, EditEvent):
        texts += [event.completion, event.edited_completion]
    else:
        texts += [event.chosen, event.rejected]
    return texts


def unchanged_send(event: EditEvent) -> bool:
    """True when the agent sent the model's reply as it was (up to normalisation): an
    approval, never a training pair."""
    return normalize(event.edited_completion) == normalize(event.completion)


def as_thumbs_up(event: EditEvent) -> RatingEvent:
    """An unchanged send, as the rating it amounts to: the agent approved the reply."""
    fields = {
        name: getattr(event, name)
        for name in RatingEvent.model_fields
        if name in event.model_fields
    }
    return RatingEvent.model_construct(**(fields | {"type": "rating", "rating": "up"}))


def pair_from(event: EditEvent | ComparisonEvent) -> PairExample:
    chosen, rejected = (
        (event.edited_completion, event.completion)
        if isinstance(event, EditEvent)
        else (event.chosen, event.rejected)
    )
    return PairExample(
        messages(event),
        chosen,
        rejected,
        event.type,
        (event.event_id,),
        prompt_id(event),
        dict(event.tags),
        actor_of(event),
    )


Vote = TypeVar("Vote")


def majority(
    votes: list[Vote],
    voter: Callable[[Vote], str],
    side: Callable[[Vote], str],
    filtered: Counter[str],
    conflict: str,
    row: str,
) -> list[Vote]:
    """The votes on the side more distinct voters took (in arrival order); [] on a tie.

    A voter's last vote counts (earlier ones are ``duplicate_<row>``); the losing side's votes
    are ``outvoted_<conflict>``, a tie drops every vote as ``contradictory_<conflict>``.
    """
    last: dict[str, Vote] = {}
    for vote in votes:
        last[voter(vote)] = vote
    filtered[f"duplicate_{row}"] += len(votes) - len(last)
    counted = [v for v in votes if last[voter(v)] is v]
    tally = Counter(side(v) for v in counted)
    ranked = tally.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        filtered[f"contradictory_{conflict}"] += len(counted)
        return []
    winner = ranked[0][0]
    filtered[f"outvoted_{conflict}"] += len(counted) - tally[winner]
    kept = [v for v in counted if side(v) == winner]
    filtered[f"duplicate_{row}"] += len(kept) - 1
    return kept


def is_heldout(prompt_sha256: str, fraction: float, salt: str) -> bool:
    """Stable split by prompt: the same prompt always lands on the same side."""
    digest = hashlib.sha256(f"{salt}:{prompt_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def kto_balance(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """Weights (λ_D, λ_U) that bring λ_D·n_D / (λ_U·n_U) into [1, 4/3] (KTO paper, §4.2).

    The minority class is up-weighted; weights are 1.0 when already in range or when a class
    is empty (there is nothing to balance against).
    """
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    ratio = n_desirable / n_undesirable
    if ratio < 1.0:
        return 1.0 / ratio, 1.0
    if ratio > 4.0 / 3.0:
        return 1.0, ratio / (4.0 / 3.0)
    return 1.0, 1.0
