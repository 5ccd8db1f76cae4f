"""Events → pairs and KTO rows: every rule and filter as a table row."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from dataset_support import build_rows
from events_support import comparison, edit, encode, rating

from feedback.config import DatasetConfig
from feedback.dataset import is_heldout, kto_balance
from feedback.events import Event, Rejection, parse_event

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def events(*raw: dict[str, Any]) -> list[Event]:
    out = []
    for r in raw:
        parsed = parse_event(encode(r))
        assert not isinstance(parsed, Rejection), parsed
        out.append(parsed)
    return out


CASES: list[tuple[str, list[dict[str, Any]], int, int, dict[str, int]]] = [
    # name, events, pairs, kto rows, filters fired
    ("edit becomes a pair", [edit("e1")], 1, 0, {}),
    ("comparison becomes a pair", [comparison("c1")], 1, 0, {}),
    ("rating becomes a KTO row", [rating("r1")], 0, 1, {}),
    (
        "up and down on one prompt: mined pair",
        [rating("r1", "Ships today."), rating("r2", "No idea.", "down")],
        1,
        2,
        {},
    ),
    (
        "up and down on different prompts: no pair",
        [rating("r1", "Ships today."), rating("r2", "No idea.", "down", prompt="Refund?")],
        0,
        2,
        {},
    ),
    (
        "whitespace/case-only edit: no pair, an accepted reply (desirable KTO row)",
        [edit("e1", "It ships  today.", "it ships today.")],
        0,
        1,
        {"trivial_edit": 1},
    ),
    (
        "chosen 3x longer than rejected",
        [edit("e1", "Ships.", "It ships today from the warehouse.")],
        0,
        0,
        {"length_ratio": 1},
    ),
    (
        "chosen exactly 2x is kept",
        [edit("e1", "Ships today.", "It ships today, Monday.")],
        1,
        0,
        {},
    ),
    ("duplicate pair", [edit("e1"), edit("e2")], 1, 0, {"duplicate_pair": 1}),
    ("duplicate rating", [rating("r1"), rating("r2")], 0, 1, {"duplicate_example": 1}),
    (
        "contradictory ratings",
        [rating("r1"), rating("r2", value="down")],
        0,
        0,
        {"contradictory_label": 2},
    ),
    ("text over the cap", [edit("e1", "x " * 5000, "y " * 4999)], 0, 0, {"too_long": 1}),
    (
        "outside the window",
        [edit("e1") | {"occurred_at": "2025-01-01T00:00:00Z"}],
        0,
        0,
        {"outside_window": 1},
    ),
]


@pytest.mark.parametrize(
    ("name", "raw", "n_pairs", "n_kto", "filtered"), CASES, ids=[c[0] for c in CASES]
)
def test_rules(
    name: str, raw: list[dict[str, Any]], n_pairs: int, n_kto: int, filtered: dict[str, int]
) -> None:
    config = DatasetConfig(recency_days=365)
    built = build_rows(events(*raw), config, NOW)
    assert len(built.pairs) == n_pairs
    assert len(built.kto) == n_kto
    assert {k: v for k, v in built.filtered.items() if v} == filtered


def test_edit_orientation_is_edited_chosen_original_rejected() -> None:
    [pair] = build_rows(
        events(edit("e1", "Sorry!! It ships today.", "It ships today.")), DatasetConfig(), NOW
    ).pairs
    assert pair.chosen == "It ships today." and pair.rejected == "Sorry!! It ships today."
    assert pair.source == "edit" and pair.event_ids == ("e1",)


def test_mined_pair_orientation() -> None:
    built = build_rows(
        events(rating("r1", "No idea.", "down"), rating("r2", "Ships today.")), DatasetConfig(), NOW
    )
    [pair] = built.pairs
    assert (pair.chosen, pair.rejected, pair.source) == ("Ships today.", "No idea.", "mined")
    assert sorted(k.label for k in built.kto) == [False, True]


def test_mining_can_be_turned_off() -> None:
    raw = events(rating("r1", "Ships today."), rating("r2", "No idea.", "down"))
    assert build_rows(raw, DatasetConfig(mine_rating_pairs=False), NOW).pairs == []


def test_same_events_any_order_same_rows() -> None:
    raw = events(
        edit("e1"), comparison("c1", prompt="Refund?"), rating("r1"), rating("r2", "No.", "down")
    )
    a = build_rows(raw, DatasetConfig(), NOW)
    b = build_rows(list(reversed(raw)), DatasetConfig(), NOW)
    assert a.pairs == b.pairs and a.kto == b.kto


def test_heldout_split_is_stable_and_near_the_fraction() -> None:
    keys = [f"{i:064x}" for i in range(4000)]
    held = [k for k in keys if is_heldout(k, 0.1, "salt")]
    assert 0.08 < len(held) / len(keys) < 0.12
    assert held == [k for k in keys if is_heldout(k, 0.1, "salt")]  # deterministic
    assert held != [k for k in keys if is_heldout(k, 0.1, "other-salt")]


@pytest.mark.parametrize(
    ("n_d", "n_u", "weights"),
    [(100, 100, (1.0, 1.0)), (120, 100, (1.0, 1.0)), (50, 100, (2.0, 1.0)), (400, 100, (1.0, 3.0)),
     (0, 10, (1.0, 1.0)), (10, 0, (1.0, 1.0))],
)  # fmt: skip
def test_kto_balance(n_d: int, n_u: int, weights: tuple[float, float]) -> None:
    w_d, w_u = kto_balance(n_d, n_u)
    assert (w_d, w_u) == pytest.approx(weights)
    if n_d and n_u:
        assert 1.0 <= (w_d * n_d) / (w_u * n_u) <= 4 / 3 + 1e-9
