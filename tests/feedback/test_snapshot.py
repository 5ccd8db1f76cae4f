"""Snapshots: loadable by `datasets` with TRL's columns, same events ⇒ same hash, and usable
by the trainer as-is."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import datasets
from events_support import comparison, edit, encode, rating

from feedback.config import DatasetConfig
from feedback.events import Rejection, parse_event
from feedback.snapshot import build_snapshot
from feedback.store import FeedbackStore, Incoming
from trainer.data import read_rows, snapshot_sha256, to_pairs
from trainer.evaluate import row_tags

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def fill(store: FeedbackStore, raws: list[dict]) -> None:
    items = []
    for raw in raws:
        parsed = parse_event(encode(raw))
        assert not isinstance(parsed, Rejection)
        items.append(Incoming(parsed))
    store.write_batch(items)


def sample_events() -> list[dict]:
    out = []
    for i in range(40):
        prompt = f"Where is my order {1000 + i}?"
        out.append(edit(f"e{i}", f"I'm so sorry! Order {1000 + i} ships today.", f"Order {1000 + i} ships today.",
                        prompt=prompt))  # fmt: skip
        out.append(rating(f"u{i}", f"Order {1000 + i} ships today.", "up", prompt=prompt))
        out.append(rating(f"d{i}", "I don't know.", "down", prompt=prompt))
    out.append(comparison("c1"))
    out.append(edit("trivial", "Ships today.", "ships  today."))
    return out


def test_snapshot_layout_manifest_and_datasets(tmp_path: Path) -> None:
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    fill(store, sample_events())
    manifest = build_snapshot(
        store, tmp_path / "snap", DatasetConfig(heldout_fraction=0.2), now=NOW
    ).model_dump(mode="json")
    snap = tmp_path / "snap"
    assert json.loads((snap / "manifest.json").read_text()) == manifest
    counts = manifest["counts"]
    assert (
        counts["pairs"]["train"] + counts["pairs"]["heldout"] == 40 + 40 + 1
    )  # edits, mined, comparison
    assert counts["kto"]["train"] + counts["kto"]["heldout"] == 80 + 1  # + the accepted reply
    assert counts["pairs"]["heldout"] > 0
    assert manifest["filtered"]["trivial_edit"] == 1
    assert manifest["pair_sources"] == {"edit": 40, "comparison": 1, "mined": 40}
    assert manifest["events"]["count"] == 40 * 3 + 2
    assert manifest["kto_balance"]["desirable_weight"] == 1.0

    pairs = datasets.load_dataset("parquet", data_files={"train": str(snap / "pairs/train.parquet"),
                                                         "test": str(snap / "pairs/heldout.parquet")})  # fmt: skip
    assert {"prompt", "chosen", "rejected"} <= set(pairs["train"].column_names)
    assert pairs["train"][0]["prompt"][0]["role"] == "user"
    kto = datasets.load_dataset("parquet", data_files=str(snap / "kto/train.parquet"))["train"]
    assert {"prompt", "completion", "label"} <= set(kto.column_names)

    # Held-out and train never share a prompt.
    train_prompts = {json.dumps(r["prompt"]) for r in pairs["train"]}
    assert not train_prompts & {json.dumps(r["prompt"]) for r in pairs["test"]}

    # The trainer reads the snapshot as it is.
    assert snapshot_sha256(snap) == manifest["sha256"]
    assert len(to_pairs(read_rows(snap, kind="pairs", split="train"))) == counts["pairs"]["train"]
    store.close()


def test_same_events_same_hash_regardless_of_arrival(tmp_path: Path) -> None:
    a, b = (
        FeedbackStore(f"sqlite:///{tmp_path / 'a.db'}"),
        FeedbackStore(f"sqlite:///{tmp_path / 'b.db'}"),
    )
    events = sample_events()
    fill(a, events)
    fill(b, list(reversed(events)))
    config = DatasetConfig()
    first = build_snapshot(a, tmp_path / "s1", config, now=NOW)
    second = build_snapshot(b, tmp_path / "s2", config, now=datetime(2026, 11, 23, tzinfo=UTC))
    assert first.sha256 == second.sha256
    fill(b, [edit("new", "Sorry. Refund sent.", "Refund sent.", prompt="Refund please")])
    third = build_snapshot(b, tmp_path / "s3", config, now=NOW)
    assert third.sha256 != first.sha256
    a.close()
    b.close()


def test_rows_keep_their_events_tags_for_the_evaluation(tmp_path: Path) -> None:
    """Policy rules and expected facts are matched on held-out prompts by their tags."""
    tags = {"category": "billing", "expected_facts": "164.58 USD | November 12, 2026"}
    events = [
        edit(f"e{i}", f"Sorry! Charged {i}.", f"Charged {i}.", prompt=f"Bill {i}?")
        for i in range(30)
    ]
    events += [rating("r1", "Charged once.", "up", prompt="Bill 99?")]
    for event in events:
        event["tags"] = tags
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    fill(store, events)
    build_snapshot(store, tmp_path / "snap", DatasetConfig(heldout_fraction=0.3), now=NOW)
    rows = read_rows(tmp_path / "snap", kind="pairs", split="heldout")
    rows += read_rows(tmp_path / "snap", kind="kto", split="train")
    rows += read_rows(tmp_path / "snap", kind="kto", split="heldout")
    assert len(rows) >= 2 and all(row_tags(row) == tags for row in rows)
    assert datasets.load_dataset("parquet", data_dir=str(tmp_path / "snap" / "pairs"))
