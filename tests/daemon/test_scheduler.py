"""When a refresh is due, and which method a snapshot gets: pure functions, tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from daemon.config import ScheduleConfig, TrainingConfig
from daemon.scheduler import RefreshState, choose_method, refresh_due
from feedback.manifest import SnapshotManifest

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
CONFIG = ScheduleConfig(
    cron="0 3 * * *", min_new_pairs=200, min_new_ratings=1000, min_interval_s=3600
)


def state(**kw: Any) -> RefreshState:
    base = {
        "running": False,
        "last_started_at": NOW - timedelta(hours=5),
        "last_cron_check": NOW - timedelta(minutes=1),
        "new_pairs": 0,
        "new_ratings": 0,
    }
    return RefreshState(**(base | kw))


CASES = [
    ("nothing new", state(), False, "nothing due"),
    ("enough new pairs", state(new_pairs=200), True, "new pairs"),
    ("enough new ratings", state(new_ratings=1500), True, "new ratings"),
    ("pairs below threshold", state(new_pairs=199), False, "nothing due"),
    ("already running", state(running=True, new_pairs=500), False, "already running"),
    (
        "too soon after the last run",
        state(last_started_at=NOW - timedelta(minutes=10), new_pairs=500),
        False,
        "minimum interval",
    ),
    (
        "operator request bypasses the interval",
        state(last_started_at=NOW - timedelta(minutes=1), manual_requested=True),
        True,
        "operator",
    ),
    (
        "operator request never runs two at once",
        state(running=True, manual_requested=True),
        False,
        "already running",
    ),
    (
        "cron fire passed since the last check",
        state(last_cron_check=datetime(2026, 11, 22, 2, 59, tzinfo=UTC)),
        True,
        "schedule",
    ),
    (
        "cron fire not yet",
        state(last_cron_check=datetime(2026, 11, 22, 3, 1, tzinfo=UTC)),
        False,
        "nothing due",
    ),
    # the daemon was down for three days: three missed fires coalesce into one due run
    (
        "missed fires coalesce",
        state(last_cron_check=NOW - timedelta(days=3), last_started_at=NOW - timedelta(days=3)),
        True,
        "schedule",
    ),
    ("first run ever", state(last_started_at=None, new_pairs=300), True, "new pairs"),
]


@pytest.mark.parametrize(("name", "st", "due", "why"), CASES, ids=[c[0] for c in CASES])
def test_refresh_due(name: str, st: RefreshState, due: bool, why: str) -> None:
    decision = refresh_due(st, NOW, CONFIG)
    assert decision.due is due
    assert why in decision.reason


def test_counts_only_schedule() -> None:
    config = ScheduleConfig(cron=None, min_new_pairs=10, min_new_ratings=None, min_interval_s=0)
    assert not refresh_due(state(last_cron_check=NOW - timedelta(days=9)), NOW, config).due
    assert refresh_due(state(new_pairs=10), NOW, config).due


def manifest(pairs: int, kto: int) -> SnapshotManifest:
    return SnapshotManifest.model_validate(
        {
            "sha256": "0" * 64,
            "counts": {
                "pairs": {"train": pairs, "heldout": 0},
                "kto": {"train": kto, "heldout": 0},
            },
            "kto_balance": {
                "desirable": 2,
                "undesirable": 4,
                "desirable_weight": 2.0,
                "undesirable_weight": 1.0,
            },
            "pair_sources": {},
            "filtered": {},
            "events": {
                "count": 0,
                "first_seq": None,
                "last_seq": None,
                "first_occurred_at": None,
                "last_occurred_at": None,
            },
            "config": {},
            "built_at": "2026-11-23T00:00:00+00:00",
        }
    )


@pytest.mark.parametrize(
    ("pairs", "kto", "policy", "method", "kind"),
    [
        (100, 0, "pairs", "dpo", "pairs"),
        (100, 500, "pairs", "dpo", "pairs"),
        (100, 500, "kto_union", "kto", "kto_union"),
        (0, 500, "pairs", "kto", "kto"),
        (3, 500, "pairs", "kto", "kto"),  # too few pairs to train on
        (3, 5, "pairs", None, "none"),
    ],
)
def test_choose_method_decision_tree(
    pairs: int, kto: int, policy: str, method: str | None, kind: str
) -> None:
    choice = choose_method(manifest(pairs, kto), TrainingConfig(both_policy=policy))  # type: ignore[arg-type]
    assert (choice.method, choice.data_kind) == (method, kind)
    if method == "kto":
        assert choice.overrides == {"desirable_weight": 2.0, "undesirable_weight": 1.0}


def test_pair_method_is_configurable() -> None:
    assert choose_method(manifest(100, 0), TrainingConfig(pair_method="dpop")).method == "dpop"
