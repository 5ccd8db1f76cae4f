"""The streaming snapshot builder (on-disk grouping) against the in-memory rules it replaces:
on random streams full of what the rules settle — repeated and flipped votes by the same and
other voters, unchanged sends, mined pairs, trivial and over-long edits, old events, several
time zones, caps that bite — both give the same rows in the same order, so the same sha256."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dataset_support import build_examples, write_snapshot

from feedback.config import DatasetConfig
from feedback.dataset import unchanged_send
from feedback.events import EditEvent, Event, parse_event
from feedback.manifest import EventRange
from feedback.snapshot import build_snapshot
from feedback.store import FeedbackStore, Incoming

NOW = datetime(2026, 11, 24, tzinfo=UTC)
REPLIES = ["Order {n} ships today.", "So sorry! Order {n} ships today.", "I don't know.",
           "Order {n} ships today!", "ORDER {n} SHIPS TODAY", "We refunded order {n}."]  # fmt: skip


def random_events(rng: random.Random, n: int) -> list[Event]:
    events = []
    for i in range(n):
        order = rng.randrange(12)
        prompt = rng.choice(["Where is my order {n}?", "where is my order {n}", "Refund {n}?"])
        at = NOW - timedelta(days=rng.choice([0, 1, 2, 30, 400]), minutes=rng.randrange(500))
        offset = rng.choice(["+00:00", "+05:30", "-08:00"])
        local = at.astimezone(datetime.strptime(offset, "%z").tzinfo)
        raw: dict[str, object] = {
            "schema_version": 1,
            "event_id": f"e{i}",
            "occurred_at": local.isoformat(),
            "prompt": [{"role": "user", "content": prompt.format(n=order)}],
            "tags": {"channel": rng.choice(["chat", "email"])},
        }
        if rng.random() < 0.8:
            raw["actor"] = {"kind": rng.choice(["user", "agent"]), "id": f"a{rng.randrange(6)}"}
        a, b = (rng.choice(REPLIES).format(n=order) for _ in range(2))
        kind = rng.random()
        if kind < 0.4:
            raw |= {"type": "rating", "completion": a, "rating": rng.choice(["up", "down"])}
        elif kind < 0.8:
            raw |= {"type": "edit", "completion": a, "edited_completion": b}
        else:
            raw |= {"type": "comparison", "chosen": a, "rejected": b}
        if rng.random() < 0.03:
            raw["type"], raw["completion"], raw["rating"] = "rating", "x " * 300, "up"
            raw.pop("edited_completion", None), raw.pop("chosen", None), raw.pop("rejected", None)
        event = parse_event(json.dumps(raw).encode(), now=NOW)
        assert isinstance(event, Event.__args__), event  # type: ignore[attr-defined]
        events.append(event)
    return events


CONFIGS = [
    DatasetConfig(heldout_fraction=0.3),
    DatasetConfig(
        heldout_fraction=0.2,
        max_rows_per_actor=4,
        max_rows_per_prompt=2,
        recency_days=90,
        max_chars=400,
        max_mined_pairs_per_prompt=2,
    ),
    DatasetConfig(heldout_fraction=0.5, mine_rating_pairs=False, max_rows_per_prompt=None),
]


def table_rows(snapshot: Path) -> dict[str, list[dict[str, object]]]:
    return {f"{kind}/{split}": pq.read_table(snapshot / kind / f"{split}.parquet").to_pylist()
            for kind in ("pairs", "kto") for split in ("train", "heldout")}  # fmt: skip


@pytest.mark.parametrize(
    ("seed", "backend"),
    [(seed, "sqlite") for seed in range(6)] + [(1, "postgresql")],
)
def test_streaming_equals_in_memory(
    seed: int, backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    rng = random.Random(seed)
    config = CONFIGS[seed % len(CONFIGS)]
    events = random_events(rng, 900 if config.max_rows_per_actor == 4 else rng.choice([60, 300]))
    url = (
        f"sqlite:///{tmp_path / 'f.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    store = FeedbackStore(url)
    shuffled = events[:]
    rng.shuffle(shuffled)  # stored in another order than they occurred
    store.write_batch([Incoming(e) for e in shuffled])
    streamed = build_snapshot(store, tmp_path / "streamed", config, now=NOW)
    stored = list(store.iter_events())
    occurred = sorted(s.event.occurred_at for s in stored)
    in_memory = write_snapshot(
        build_examples([s.event for s in stored], config, NOW),
        tmp_path / "memory",
        config=config,
        event_range=EventRange(
            count=len(stored),
            first_seq=stored[0].seq,
            last_seq=stored[-1].seq,
            first_occurred_at=occurred[0].isoformat(),
            last_occurred_at=occurred[-1].isoformat(),
            corrections=dict(
                sorted(
                    Counter(
                        s.event.served_adapter or ""
                        for s in stored
                        if isinstance(s.event, EditEvent) and not unchanged_send(s.event)
                    ).items()
                )
            ),
        ),
        built_at=NOW,
    )
    assert streamed.model_dump() == in_memory.model_dump()
    assert table_rows(tmp_path / "streamed") == table_rows(tmp_path / "memory")
    assert streamed.counts.pairs.train > 0 and streamed.counts.kto.train > 0
    if config.max_rows_per_actor == 4:  # the caps bite
        assert streamed.filtered["actor_cap"] > 0 and streamed.filtered["prompt_cap"] > 0
    store.close()


def test_work_files_are_removed(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    store.write_batch([Incoming(e) for e in random_events(random.Random(1), 50)])
    build_snapshot(store, tmp_path / "snaps" / "s1", DatasetConfig(), now=NOW)
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == ["s1"]
    store.close()
