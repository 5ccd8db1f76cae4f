"""Training-data integrity: normalisation before dedupe and split, majority over contradictions,
per-actor and per-prompt caps, and the manifest's actor shares."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dataset_support import build_rows
from events_support import comparison, edit, encode, rating
from pydantic import SecretStr

from feedback.config import DatasetConfig
from feedback.dataset import normalize, prompt_id
from feedback.events import Event, Rejection, parse_event
from feedback.manifest import SnapshotManifest
from feedback.snapshot import build_snapshot, split_of
from feedback.store import FeedbackStore, Incoming

NOW = datetime(2026, 11, 23, tzinfo=UTC)
OPEN = DatasetConfig(max_rows_per_actor=None, max_rows_per_prompt=None)


def ev(raw: dict[str, Any]) -> Event:
    parsed = parse_event(encode(raw))
    assert not isinstance(parsed, Rejection), parsed
    return parsed


def by(actor: str, kind: str = "agent") -> dict[str, Any]:
    return {"actor": {"kind": kind, "id": actor}}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Where is my order?", "where is my order"),
        ("Order 1234 ships today.", "Order 1234 ships today"),
        ("Order 1234 ships today.", "ORDER 1234  ships\ttoday !"),
        ("ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ", "fullwidth text"),  # NFKC
        ("ships\u200b today", "ships today"),  # zero-width space
        ("ship\u00adping", "shipping"),  # soft hyphen
        ("Straße", "STRASSE"),  # casefold
    ],
)
def test_variants_normalise_equal(a: str, b: str) -> None:
    assert normalize(a) == normalize(b)


@pytest.mark.parametrize(("a", "b"), [("$12.34", "$1234"), ("don't", "dont"), ("a-1", "a 1")])
def test_punctuation_inside_a_word_or_number_is_kept(a: str, b: str) -> None:
    assert normalize(a) != normalize(b)


def test_prompt_variants_are_one_prompt_on_one_side_of_the_split() -> None:
    variants = ["Where is my order 7?", "where is my order 7", "WHERE IS MY ORDER 7 ?",
                "Where\u200b is my order 7?"]  # fmt: skip
    events = [ev(rating(f"r{i}", prompt=p)) for i, p in enumerate(variants)]
    assert len({prompt_id(e) for e in events}) == 1
    config = DatasetConfig(heldout_fraction=0.5, split_salt=SecretStr("s"))
    examples = build_rows(events, config, NOW)
    assert len({split_of(k.prompt_sha256, config) for k in examples.kto}) == 1
    assert len(examples.kto) == 1 and examples.filtered["duplicate_example"] == 3


def test_near_duplicate_pairs_are_one_pair() -> None:
    events = [
        ev(edit("e1", completion="Sorry, it is late.", edited="It ships today.", **by("a"))),
        ev(edit("e2", completion="Sorry, it is late", edited="It ships today..", **by("b"))),
        ev(edit("e3", completion="sorry,  it is LATE.", edited="It ships\u200b today.", **by("c"))),
    ]
    examples = build_rows(events, OPEN, NOW)
    assert len(examples.pairs) == 1 and examples.filtered["duplicate_pair"] == 2


def test_an_edit_that_adds_only_invisible_characters_or_a_dot_is_no_pair() -> None:
    for edited in ("It ships today.\u200b", "It ships today..", "It ships today"):
        examples = build_rows([ev(edit("e", completion="It ships today.", edited=edited))],
                                  OPEN, NOW)  # fmt: skip
        assert examples.pairs == [] and examples.filtered["trivial_edit"] == 1, edited
        assert [k.label for k in examples.kto] == [True]  # an accepted reply


def test_one_opposite_vote_does_not_erase_fifty() -> None:
    ups = [ev(rating(f"u{i}", **by(f"user{i}", "user"))) for i in range(50)]
    down = ev(rating("d", value="down", **by("grump", "user")))
    examples = build_rows([*ups, down], OPEN, NOW)
    assert [k.label for k in examples.kto] == [True]
    assert examples.filtered["outvoted_label"] == 1
    assert examples.filtered["contradictory_label"] == 0


def test_pair_majority_by_distinct_voters_not_by_events() -> None:
    good = [ev(comparison(f"g{i}", **by(f"ann{i}", "annotator"))) for i in range(3)]
    # One account repeats the opposite preference 40 times: it is one voter.
    spam = [
        ev(comparison(f"s{i}", chosen="Sorry, no idea.", rejected="It ships today.", **by("x")))
        for i in range(40)
    ]
    examples = build_rows([*good, *spam], OPEN, NOW)
    assert [(p.chosen, p.rejected) for p in examples.pairs] == [
        ("It ships today.", "Sorry, no idea.")
    ]
    assert examples.filtered["outvoted_pair"] == 1
    assert examples.filtered["duplicate_pair"] == 39 + 2


def test_a_tie_drops_both_sides() -> None:
    events = [
        ev(comparison("c1", **by("a"))),
        ev(comparison("c2", chosen="Sorry, no idea.", rejected="It ships today.", **by("b"))),
    ]
    examples = build_rows(events, OPEN, NOW)
    assert examples.pairs == [] and examples.filtered["contradictory_pair"] == 2


def test_a_voters_later_vote_replaces_its_earlier_one() -> None:
    first = rating("r1", value="up", **by("u", "user"))
    later = rating("r2", value="down", **by("u", "user")) | {"occurred_at": "2026-11-21T10:00:00Z"}
    examples = build_rows([ev(later), ev(first)], OPEN, NOW)
    assert [k.label for k in examples.kto] == [False]


def flood(n_flood: int, n_others: int, per_other: int) -> list[Event]:
    events = [
        ev(edit(f"f{i}", prompt=f"flood question {i}", **by("mallory"))) for i in range(n_flood)
    ]
    for a in range(n_others):
        for i in range(per_other):
            events.append(ev(edit(f"o{a}-{i}", prompt=f"question {a}-{i}", **by(f"agent{a}"))))
    return events


def test_actor_cap_keeps_the_most_recent_rows_and_counts_the_rest() -> None:
    events = flood(300, 10, 5)
    examples = build_rows(events, DatasetConfig(max_rows_per_actor=50), NOW)
    mallory = [p for p in examples.pairs if p.actor == "agent:mallory"]
    assert len(mallory) == 50 and examples.filtered["actor_cap"] == 250
    assert len(examples.pairs) == 50 + 50


def test_prompt_cap() -> None:
    events = [ev(edit(f"e{i}", edited=f"It ships on day {i}.", **by(f"a{i}"))) for i in range(30)]
    examples = build_rows(events, DatasetConfig(max_rows_per_prompt=20), NOW)
    assert len(examples.pairs) == 20 and examples.filtered["prompt_cap"] == 10


def test_manifest_reports_actor_shares_without_account_ids(tmp_path: Path) -> None:
    config = DatasetConfig(max_rows_per_actor=None, split_salt=SecretStr("s"))
    store = FeedbackStore(f"sqlite:///{tmp_path / 'f.db'}")
    store.write_batch([Incoming(e) for e in flood(90, 10, 1)])
    build_snapshot(store, tmp_path / "snap", config, now=NOW)
    store.close()
    manifest = SnapshotManifest.load(tmp_path / "snap")
    assert manifest.actors is not None
    assert manifest.actors.largest_share == pytest.approx(0.9)
    assert manifest.actors.distinct == 11 and manifest.split_salt == "secret"
    top = manifest.actors.top[0]
    assert top.kind == "agent" and top.rows == 90 and "mallory" not in manifest.model_dump_json()
    assert "**" in manifest.model_dump_json() and '"s"' not in manifest.model_dump_json()


def test_the_salt_decides_the_split() -> None:
    keys = [prompt_id(ev(rating(f"r{i}", prompt=f"q{i}"))) for i in range(200)]

    def held(salt: str) -> set[str]:
        config = DatasetConfig(heldout_fraction=0.2, split_salt=SecretStr(salt))
        return {k for k in keys if split_of(k, config) == "heldout"}

    assert held("one") == held("one") and held("one") != held("two")
