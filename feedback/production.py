"""Production feedback per served adapter: the signals a support desk watches.

Every event names the adapter that produced the reply (``served_adapter``). Over a window of
one adapter's events this counts:

- **edit rate**: of the replies agents handled (``edit`` events), the share they changed before
  sending. An agent who sends the draft unchanged sends an ``edit`` whose
  ``edited_completion`` equals ``completion`` (after :func:`feedback.dataset.normalize`): an
  unchanged send, counted here as served-not-edited and in training as an approval, never as
  a pair;
- **edit size**: over the changed replies, the mean normalised edit distance, 1 − difflib's
  similarity ratio over words (0: the same words, 1: nothing kept);
- **thumbs-down rate**: of users' ratings, the share that were down.

Comparisons are annotators' work, not production traffic, and are not counted.

**People, not events.** Each actor (``actor.kind:actor.id``; events naming none are one actor,
"unattributed") counts at most ``per_actor`` of their newest events per signal, so one account
cannot outvote a desk; the summary keeps how many actors each signal heard and the largest
single-actor share of what was counted, for the watch to require several and refuse a verdict
one actor dominates (:func:`daemon.watch.judge`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from difflib import SequenceMatcher

from feedback.dataset import unchanged_send
from feedback.events import EditEvent, Event, RatingEvent


def edit_size(original: str, edited: str) -> float:
    """1 − similarity of the two texts' word sequences: 0 unchanged, 1 completely rewritten."""
    matcher = SequenceMatcher(None, original.split(), edited.split(), autojunk=False)
    return 1.0 - matcher.ratio()


UNATTRIBUTED = "unattributed"


def actor_key(event: Event) -> str:
    """Who gave the feedback: ``kind:id``; every event naming no actor is the same one."""
    return f"{event.actor.kind}:{event.actor.id}" if event.actor else UNATTRIBUTED


@dataclass(frozen=True)
class PerActor:
    """How many of one actor's newest events each signal counts (None: all of them)."""

    edits: int | None = None
    ratings: int | None = None


@dataclass(frozen=True)
class AdapterFeedback:
    """One adapter's production feedback over a window (after the per-actor caps)."""

    handled: int = 0  # replies agents sent, changed or not (edit events)
    edited: int = 0  # of those, changed
    edit_size_sum: float = 0.0  # over the changed ones
    rated: int = 0  # users' ratings
    down: int = 0  # of those, thumbs down
    editors: int = 0  # distinct actors among the counted edits
    raters: int = 0  # distinct actors among the counted ratings
    top_edit_share: float = 0.0  # the largest single actor's share of the counted edits
    top_rating_share: float = 0.0
    capped: int = 0  # events past their actor's cap, not counted
    outside: int = 0  # events naming the adapter dated outside its service, not counted

    @property
    def edit_rate(self) -> float | None:
        return self.edited / self.handled if self.handled else None

    @property
    def edit_size(self) -> float | None:
        return self.edit_size_sum / self.edited if self.edited else None

    @property
    def thumbs_down_rate(self) -> float | None:
        return self.down / self.rated if self.rated else None


def top_share(counts: Counter[str]) -> float:
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


def counted(
    events: Iterable[Event], per_actor: PerActor = PerActor()
) -> tuple[list[EditEvent | RatingEvent], int]:
    """The ratings and edits that count, each actor's newest up to ``per_actor`` per signal
    (``events`` newest first, as :meth:`feedback.store.FeedbackStore.recent_served` reads
    them), and how many were past their actor's cap."""
    kept: list[EditEvent | RatingEvent] = []
    capped = 0
    seen: dict[type, Counter[str]] = {EditEvent: Counter(), RatingEvent: Counter()}
    for event in events:
        if not isinstance(event, EditEvent | RatingEvent):
            continue
        cap = per_actor.edits if isinstance(event, EditEvent) else per_actor.ratings
        who, counts = actor_key(event), seen[type(event)]
        if cap is not None and counts[who] >= cap:
            capped += 1
            continue
        counts[who] += 1
        kept.append(event)
    return kept, capped


def summarize(events: Iterable[Event], per_actor: PerActor = PerActor()) -> AdapterFeedback:
    """``events`` newest first, so an actor's cap keeps their newest (:func:`counted`)."""
    kept, capped = counted(events, per_actor)
    handled = edited = rated = down = 0
    size = 0.0
    edits: Counter[str] = Counter()
    ratings: Counter[str] = Counter()
    for event in kept:
        if isinstance(event, EditEvent):
            edits[actor_key(event)] += 1
            handled += 1
            if not unchanged_send(event):
                edited += 1
                size += edit_size(event.completion, event.edited_completion)
        else:
            ratings[actor_key(event)] += 1
            rated += 1
            down += event.rating == "down"
    return AdapterFeedback(
        handled, edited, size, rated, down, editors=len(edits), raters=len(ratings),
        top_edit_share=top_share(edits), top_rating_share=top_share(ratings), capped=capped,
    )  # fmt: skip
