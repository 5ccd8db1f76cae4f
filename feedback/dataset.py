"""Events → DPO pairs and KTO examples. Pure functions, no I/O.

Rules (each filter is counted, so the manifest says what was dropped and why):

- ``edit`` → pair (chosen = edited reply, rejected = the model's reply);
- ``comparison`` → pair;
- ``rating`` → KTO example (desirable = up); an ``up`` and a ``down`` on the same prompt for
  different replies → also a *mined* pair (up = chosen);
- ``trivial_edit``: chosen and rejected identical after whitespace/case normalisation. An
  ``edit`` whose agent sent the model's reply unchanged is an *accepted* reply: no pair, but a
  desirable KTO example (like a thumbs-up from the agent);
- ``length_ratio``: chosen more than k× longer (in words) than rejected — the length-bias
  guard of the DPO checklist: otherwise the cheapest way to win is to be long;
- ``duplicate_pair`` / ``duplicate_example``: the same row again (first one kept);
- ``contradictory_label``: the same (prompt, reply) rated both up and down — all dropped;
- ``too_long``: a text over the character cap; ``outside_window``: older than the window.

Events are processed in (occurred_at, event_id) order, so the same events always give the
same rows in the same order, whatever order they were read in.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import product

from feedback.config import DatasetConfig
from feedback.events import ComparisonEvent, EditEvent, Event, RatingEvent, prompt_key

Messages = list[dict[str, str]]
FILTERS = (
    "trivial_edit",
    "length_ratio",
    "duplicate_pair",
    "duplicate_example",
    "contradictory_label",
    "too_long",
    "outside_window",
)


@dataclass(frozen=True)
class PairExample:
    prompt: Messages
    chosen: str
    rejected: str
    source: str  # edit | comparison | mined
    event_ids: tuple[str, ...]
    prompt_sha256: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class KTOExample:
    prompt: Messages
    completion: str
    label: bool  # True = desirable
    event_id: str
    prompt_sha256: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Examples:
    pairs: list[PairExample] = field(default_factory=list)
    kto: list[KTOExample] = field(default_factory=list)
    filtered: Counter[str] = field(default_factory=Counter)


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def _words(text: str) -> int:
    return len(text.split())


def _messages(event: Event) -> Messages:
    return [{"role": m.role, "content": m.content} for m in event.prompt]


def _texts(event: Event) -> list[str]:
    texts = [m.content for m in event.prompt]
    if isinstance(event, RatingEvent):
        texts.append(event.completion)
    elif isinstance(event, EditEvent):
        texts += [event.completion, event.edited_completion]
    else:
        texts += [event.chosen, event.rejected]
    return texts


def _accepted(event: EditEvent) -> bool:
    return normalize(event.edited_completion) == normalize(event.completion)


def _as_thumbs_up(event: EditEvent) -> RatingEvent:
    """An unchanged send, as the rating it amounts to: the agent approved the reply."""
    fields = {
        name: getattr(event, name)
        for name in RatingEvent.model_fields
        if name in event.model_fields
    }
    return RatingEvent.model_construct(**(fields | {"type": "rating", "rating": "up"}))


def _pair_from(event: EditEvent | ComparisonEvent) -> PairExample:
    chosen, rejected = (
        (event.edited_completion, event.completion)
        if isinstance(event, EditEvent)
        else (event.chosen, event.rejected)
    )
    return PairExample(
        _messages(event),
        chosen,
        rejected,
        event.type,
        (event.event_id,),
        prompt_key(event.prompt),
        dict(event.tags),
    )


def _ratings_to_examples(
    ratings: list[RatingEvent], config: DatasetConfig, filtered: Counter[str]
) -> tuple[list[KTOExample], list[PairExample]]:
    by_reply: dict[tuple[str, str], list[RatingEvent]] = defaultdict(list)
    for r in ratings:
        by_reply[(prompt_key(r.prompt), normalize(r.completion))].append(r)
    kto: list[KTOExample] = []
    for group in by_reply.values():
        if len({r.rating for r in group}) > 1:
            filtered["contradictory_label"] += len(group)
            continue
        first = group[0]
        filtered["duplicate_example"] += len(group) - 1
        kto.append(
            KTOExample(
                _messages(first),
                first.completion,
                first.rating == "up",
                first.event_id,
                prompt_key(first.prompt),
                dict(first.tags),
            )
        )
    mined: list[PairExample] = []
    if config.mine_rating_pairs:
        by_prompt: dict[str, list[KTOExample]] = defaultdict(list)
        for example in kto:
            by_prompt[example.prompt_sha256].append(example)
        for examples in by_prompt.values():
            ups = [e for e in examples if e.label]
            downs = [e for e in examples if not e.label]
            for up, down in list(product(ups, downs))[: config.max_mined_pairs_per_prompt]:
                mined.append(
                    PairExample(
                        up.prompt,
                        up.completion,
                        down.completion,
                        "mined",
                        (up.event_id, down.event_id),
                        up.prompt_sha256,
                        up.tags,
                    )
                )
    return kto, mined


def build_examples(events: Sequence[Event], config: DatasetConfig, now: datetime) -> Examples:
    """All training rows the events support under ``config``, with per-filter counts."""
    out = Examples()
    oldest = now - timedelta(days=config.recency_days) if config.recency_days else None
    candidates: list[PairExample] = []
    ratings: list[RatingEvent] = []
    for ev in sorted(events, key=lambda e: (e.occurred_at, e.event_id)):
        if oldest is not None and ev.occurred_at < oldest:
            out.filtered["outside_window"] += 1
        elif any(len(t) > config.max_chars for t in _texts(ev)):
            out.filtered["too_long"] += 1
        elif isinstance(ev, RatingEvent):
            ratings.append(ev)
        elif isinstance(ev, EditEvent) and _accepted(ev):
            out.filtered["trivial_edit"] += 1
            ratings.append(_as_thumbs_up(ev))
        else:
            candidates.append(_pair_from(ev))
    out.kto, mined = _ratings_to_examples(ratings, config, out.filtered)

    seen: set[tuple[str, str, str]] = set()
    for pair in candidates + mined:
        key = (pair.prompt_sha256, normalize(pair.chosen), normalize(pair.rejected))
        if key[1] == key[2]:
            out.filtered["trivial_edit"] += 1
        elif _words(pair.chosen) > config.max_length_ratio * max(1, _words(pair.rejected)):
            out.filtered["length_ratio"] += 1
        elif key in seen:
            out.filtered["duplicate_pair"] += 1
        else:
            seen.add(key)
            out.pairs.append(pair)
    return out


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
