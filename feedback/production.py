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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from difflib import SequenceMatcher

from feedback.dataset import unchanged_send
from feedback.events import EditEvent, Event, RatingEvent


def edit_size(original: str, edited: str) -> float:
    """1 − similarity of the two texts' word sequences: 0 unchanged, 1 completely rewritten."""
    matcher = SequenceMatcher(None, original.split(), edited.split(), autojunk=False)
    return 1.0 - matcher.ratio()


@dataclass(frozen=True)
class AdapterFeedback:
    """One adapter's production feedback over a window."""

    handled: int = 0  # replies agents sent, changed or not (edit events)
    edited: int = 0  # of those, changed
    edit_size_sum: float = 0.0  # over the changed ones
    rated: int = 0  # users' ratings
    down: int = 0  # of those, thumbs down

    @property
    def edit_rate(self) -> float | None:
        return self.edited / self.handled if self.handled else None

    @property
    def edit_size(self) -> float | None:
        return self.edit_size_sum / self.edited if self.edited else None

    @property
    def thumbs_down_rate(self) -> float | None:
        return self.down / self.rated if self.rated else None


def summarize(events: Iterable[Event]) -> AdapterFeedback:
    handled = edited = rated = down = 0
    size = 0.0
    for event in events:
        if isinstance(event, EditEvent):
            handled += 1
            if not unchanged_send(event):
                edited += 1
                size += edit_size(event.completion, event.edited_completion)
        elif isinstance(event, RatingEvent):
            rated += 1
            down += event.rating == "down"
    return AdapterFeedback(handled, edited, size, rated, down)
