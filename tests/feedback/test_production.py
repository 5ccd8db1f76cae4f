"""Production feedback per served adapter: what counts as handled, edited and rated, the edit
size, and the store query behind the regression watch's windows."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dataset_support import build_rows
from events_support import comparison, edit, rating

from feedback.config import DatasetConfig
from feedback.events import Event, parse_event
from feedback.production import edit_size, summarize
from feedback.store import FeedbackStore, Incoming

NOW = datetime(2026, 11, 24, tzinfo=UTC)


def ev(raw: dict[str, object]) -> Event:
    event = parse_event(json.dumps(raw).encode(), now=NOW)
    assert not hasattr(event, "reason"), event
    return event  # type: ignore[return-value]


def test_unchanged_sends_count_as_handled_not_edited_and_never_as_pairs() -> None:
    events = [
        ev(edit("e1")),  # changed
        ev(edit("e2", completion="It ships today.", edited="It ships today.")),  # unchanged
        ev(edit("e3", completion="It ships today.", edited="it ships today")),  # normalises equal
        ev(rating("r1", value="down")),
        ev(rating("r2", value="up")),
        ev(comparison("c1")),  # annotators' work: not production traffic
    ]
    summary = summarize(events)
    assert (summary.handled, summary.edited, summary.rated, summary.down) == (3, 1, 2, 1)
    assert summary.edit_rate == pytest.approx(1 / 3)
    assert summary.thumbs_down_rate == 0.5
    examples = build_rows(events[1:3], DatasetConfig(), NOW)
    assert examples.pairs == []
    assert examples.kto and all(k.label for k in examples.kto)  # approvals, never pairs


def test_edit_size() -> None:
    assert edit_size("It ships today.", "It ships today.") == 0.0
    assert edit_size("a b c d", "w x y z") == 1.0
    assert edit_size("I am so sorry. It ships today.", "It ships today.") == pytest.approx(
        1 - 2 * 3 / (7 + 3)
    )
    assert summarize([]).edit_size is None and summarize([]).edit_rate is None


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FeedbackStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'f.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = FeedbackStore(url)
    yield s
    s.close()


def test_recent_served_filters_by_adapter_type_time_and_limit(store: FeedbackStore) -> None:
    raws = [
        edit("a1", served_adapter="v0001"),
        rating("a2", served_adapter="v0001", occurred_at="2026-11-23T10:00:00Z"),
        edit("a3", served_adapter="alignd-v0001"),
        comparison("a4", served_adapter="v0001"),
        edit("b1", served_adapter="v0002"),
        edit("s1"),  # no adapter: the SFT model
        edit("old", served_adapter="v0001", occurred_at="2026-11-01T10:00:00Z"),
    ]
    store.write_batch([Incoming(ev(r)) for r in raws])
    since = datetime(2026, 11, 10, tzinfo=UTC)

    def ids(names: list[str | None], limit: int = 100) -> list[str]:
        return [e.event_id for e in store.recent_served(names, since=since, limit=limit)]

    assert ids(["v0001", "alignd-v0001"]) == ["a3", "a2", "a1"]  # newest first
    assert ids(["v0001", "alignd-v0001"], limit=2) == ["a3", "a2"]
    assert ids([None]) == ["s1"]
    assert ids(["v0002", None]) == ["s1", "b1"]
    assert ids([]) == []
