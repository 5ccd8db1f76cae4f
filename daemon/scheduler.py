"""When to refresh: a pure function of (state, now, config), plus the method decision tree.

The APScheduler job only gathers the state and calls :func:`refresh_due`; everything that
decides is here and tested with tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger

from daemon.config import ScheduleConfig, TrainingConfig
from daemon.states import RefreshTrigger
from feedback.manifest import SnapshotManifest


@dataclass(frozen=True)
class RefreshState:
    running: bool
    last_started_at: datetime | None  # last refresh start, whatever its outcome
    last_cron_check: datetime | None  # when cron was last evaluated (coalesces misfires)
    new_pairs: int  # usable new edit/comparison events since the last snapshot
    new_ratings: int
    manual_requested: bool = False


@dataclass(frozen=True)
class Due:
    due: bool
    reason: str
    trigger: RefreshTrigger | None = None  # set when due


def next_cron_fire(expression: str, after: datetime) -> datetime:
    fire: datetime | None = CronTrigger.from_crontab(expression, timezone="UTC").get_next_fire_time(
        None, after
    )
    assert fire is not None
    return fire


def refresh_due(state: RefreshState, now: datetime, config: ScheduleConfig) -> Due:
    """Is a refresh due now, and why (or why not)?

    Never two at once. An operator's request bypasses the minimum interval; automatic triggers
    (cron, feedback counts) respect it. Any number of cron fires missed while the daemon was
    down or busy coalesce into one run.
    """
    if state.running:
        return Due(False, "a refresh is already running")
    if state.manual_requested:
        return Due(True, "operator request", RefreshTrigger.OPERATOR)
    if state.last_started_at is not None:
        wait = state.last_started_at + timedelta(seconds=config.min_interval_s) - now
        if wait > timedelta(0):
            return Due(False, f"minimum interval: {wait.total_seconds():.0f}s left")
    if config.cron and state.last_cron_check is not None:
        fire = next_cron_fire(config.cron, state.last_cron_check)
        if fire <= now:
            return Due(
                True,
                f"schedule {config.cron!r} (fire time {fire.isoformat()})",
                RefreshTrigger.SCHEDULE,
            )
    if config.min_new_pairs is not None and state.new_pairs >= config.min_new_pairs:
        return Due(
            True,
            f"{state.new_pairs} new pairs (threshold {config.min_new_pairs})",
            RefreshTrigger.NEW_PAIRS,
        )
    if config.min_new_ratings is not None and state.new_ratings >= config.min_new_ratings:
        return Due(
            True,
            f"{state.new_ratings} new ratings (threshold {config.min_new_ratings})",
            RefreshTrigger.NEW_RATINGS,
        )
    return Due(False, "nothing due")


@dataclass(frozen=True)
class MethodChoice:
    method: str | None  # None: not enough data to train
    data_kind: str  # pairs | kto | kto_union
    reason: str
    overrides: dict[str, Any]


def choose_method(manifest: SnapshotManifest, config: TrainingConfig) -> MethodChoice:
    """The seeds' decision tree over a snapshot manifest.

    Pairs available → the configured DPO-family loss. Only thumbs → KTO with the snapshot's
    class-balance weights. Both → ``both_policy``: DPO on the pairs, or KTO on the union with
    each pair split into a desirable and an undesirable row.
    """
    pairs, kto = manifest.counts.pairs.train, manifest.counts.kto.train
    weights = {
        "desirable_weight": manifest.kto_balance.desirable_weight,
        "undesirable_weight": manifest.kto_balance.undesirable_weight,
    }
    has_pairs, has_kto = pairs >= config.min_pairs, kto >= config.min_kto_rows
    if has_pairs and (not has_kto or config.both_policy == "pairs"):
        return MethodChoice(config.pair_method, "pairs", f"{pairs} training pairs", {})
    if has_pairs and has_kto:
        return MethodChoice(
            "kto", "kto_union", f"{kto} thumbs + {pairs} pairs split (both_policy)", weights
        )
    if has_kto:
        return MethodChoice("kto", "kto", f"only thumbs: {kto} rows", weights)
    return MethodChoice(
        None,
        "none",
        f"not enough data: {pairs} pairs (< {config.min_pairs}), "
        f"{kto} thumbs (< {config.min_kto_rows})",
        {},
    )
