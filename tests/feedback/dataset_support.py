"""The dataset rules two ways: the product's builder on a list of events, and an oracle.

:func:`build_rows` runs :mod:`feedback.grouping` (the builder every snapshot uses) on events held
in a list and reads its rows back as examples: the rule tests go through it. :func:`build_examples`
is the same rules (:mod:`feedback.dataset`'s docstring) over a list, written the obvious way;
the streaming test compares the two row for row on random streams. The oracle is not shipped.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import product
from pathlib import Path
from typing import Any, TypeVar

from feedback.config import DatasetConfig
from feedback.dataset import (
    UNATTRIBUTED,
    KTOExample,
    PairExample,
    actor_of,
    as_thumbs_up,
    majority,
    messages,
    normalize,
    pair_from,
    prompt_id,
    texts,
    unchanged_send,
    voter,
    words,
)
from feedback.events import EditEvent, Event, RatingEvent
from feedback.grouping import build_rows_on_disk, kto_row, pair_row
from feedback.manifest import ActorShares, EventRange, SnapshotManifest
from feedback.snapshot import SPLITS, shares_of, split_of, write_rows


@dataclass
class Examples:
    pairs: list[PairExample] = field(default_factory=list)
    kto: list[KTOExample] = field(default_factory=list)
    filtered: Counter[str] = field(default_factory=Counter)


def _ratings_to_examples(
    ratings: list[RatingEvent], config: DatasetConfig, filtered: Counter[str]
) -> tuple[list[KTOExample], list[PairExample]]:
    by_reply: dict[tuple[str, str], list[RatingEvent]] = defaultdict(list)
    for r in ratings:
        by_reply[(prompt_id(r), normalize(r.completion))].append(r)
    kto: list[KTOExample] = []
    for group in by_reply.values():
        winners = majority(group, voter, lambda r: r.rating, filtered, "label", "example")
        if not winners:
            continue
        first = winners[0]
        kto.append(
            KTOExample(
                messages(first),
                first.completion,
                first.rating == "up",
                first.event_id,
                prompt_id(first),
                dict(first.tags),
                actor_of(first),
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
                        up.actor,
                    )
                )
    return kto, mined


Row = TypeVar("Row", PairExample, KTOExample)


def _cap(
    rows: list[Row],
    key: Callable[[Row], str],
    limit: int | None,
    filtered: Counter[str],
    name: str,
) -> list[Row]:
    """At most ``limit`` rows per key, the most recent kept (rows arrive oldest first)."""
    if limit is None:
        return rows
    seen: Counter[str] = Counter()
    keep = [False] * len(rows)
    for i in range(len(rows) - 1, -1, -1):
        k = key(rows[i])
        if not k or seen[k] < limit:  # "" (no actor) is not an identity to cap on
            seen[k] += 1
            keep[i] = True
        else:
            filtered[name] += 1
    return [row for row, kept in zip(rows, keep, strict=True) if kept]


def build_examples(events: Sequence[Event], config: DatasetConfig, now: datetime) -> Examples:
    """All training rows the events support under ``config``, with per-filter counts."""
    out = Examples()
    oldest = now - timedelta(days=config.recency_days) if config.recency_days else None
    candidates: list[PairExample] = []
    ratings: list[RatingEvent] = []
    for ev in sorted(events, key=lambda e: (e.occurred_at, e.event_id)):
        if oldest is not None and ev.occurred_at < oldest:
            out.filtered["outside_window"] += 1
        elif any(len(t) > config.max_chars for t in texts(ev)):
            out.filtered["too_long"] += 1
        elif isinstance(ev, RatingEvent):
            ratings.append(ev)
        elif isinstance(ev, EditEvent) and unchanged_send(ev):
            out.filtered["trivial_edit"] += 1
            ratings.append(as_thumbs_up(ev))
        else:
            candidates.append(pair_from(ev))
    out.kto, mined = _ratings_to_examples(ratings, config, out.filtered)

    out.pairs = _resolve_pairs(candidates + mined, config, out.filtered)
    _apply_caps(out, config)
    return out


def _resolve_pairs(
    pairs: list[PairExample], config: DatasetConfig, filtered: Counter[str]
) -> list[PairExample]:
    """Drop trivial and too-long pairs; settle A>B against B>A on one prompt by majority."""
    # A>B and B>A on one prompt are votes on one question: group them by the unordered pair.
    questions: dict[tuple[str, str, str], list[tuple[str, PairExample]]] = defaultdict(list)
    for pair in pairs:
        chosen, rejected = normalize(pair.chosen), normalize(pair.rejected)
        if chosen == rejected:
            filtered["trivial_edit"] += 1
        elif words(pair.chosen) > config.max_length_ratio * max(1, words(pair.rejected)):
            filtered["length_ratio"] += 1
        else:
            low, high = sorted((chosen, rejected))
            questions[(pair.prompt_sha256, low, high)].append((chosen, pair))
    kept = []
    for votes in questions.values():
        winners = majority(votes, lambda v: v[1].voter, lambda v: v[0], filtered, "pair", "pair")
        if winners:
            kept.append(winners[0][1])
    return kept


def _apply_caps(out: Examples, config: DatasetConfig) -> None:
    def actor(row: PairExample | KTOExample) -> str:
        return row.actor

    def prompt(row: PairExample | KTOExample) -> str:
        return row.prompt_sha256

    for name, key, limit in (
        ("actor_cap", actor, config.max_rows_per_actor),
        ("prompt_cap", prompt, config.max_rows_per_prompt),
    ):
        out.pairs = _cap(out.pairs, key, limit, out.filtered, name)
        out.kto = _cap(out.kto, key, limit, out.filtered, name)


def actor_shares(examples: Examples, config: DatasetConfig, top: int = 5) -> ActorShares:
    """Who supplied the rows (pairs and KTO together), overall and in the held-out split.

    Actors are named by a hash of ``kind:id`` (the manifest is no place for account ids);
    events with no actor form one ``(unattributed)`` bucket.
    """
    rows: Counter[str] = Counter()
    heldout: Counter[str] = Counter()
    everything: list[PairExample | KTOExample] = [*examples.pairs, *examples.kto]
    for row in everything:
        who = row.actor or UNATTRIBUTED
        rows[who] += 1
        if split_of(row.prompt_sha256, config) == "heldout":
            heldout[who] += 1
    ranked = sorted(rows.items(), key=lambda kv: (-kv[1], kv[0]))
    return shares_of((who, n, heldout[who]) for who, n in ranked)


def split_rows(
    examples: Examples, config: DatasetConfig
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{"pairs": {"train": [...], "heldout": [...]}, "kto": {...}}``, split by prompt hash."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {
        "pairs": {s: [] for s in SPLITS},
        "kto": {s: [] for s in SPLITS},
    }

    for p in examples.pairs:
        out["pairs"][split_of(p.prompt_sha256, config)].append(pair_row(p))
    for k in examples.kto:
        out["kto"][split_of(k.prompt_sha256, config)].append(kto_row(k))
    return out


def write_snapshot(
    examples: Examples,
    out_dir: Path,
    *,
    config: DatasetConfig,
    event_range: EventRange,
    built_at: datetime | None = None,
) -> SnapshotManifest:
    """Write rows built in memory as a snapshot (atomically) and return its manifest."""
    rows = split_rows(examples, config)
    return write_rows(
        out_dir,
        lambda kind, split: rows[kind][split],
        filtered=examples.filtered,
        actors=actor_shares(examples, config),
        event_range=event_range,
        config=config,
        built_at=built_at or datetime.now(UTC),
    )


def build_rows(events: Sequence[Event], config: DatasetConfig, now: datetime) -> Examples:
    """The product's rows for ``events`` (both splits, in the rules' order), as examples."""
    with tempfile.TemporaryDirectory(prefix="alignd-rows-") as work:
        disk = build_rows_on_disk(
            enumerate(events), config, now, Path(work) / "rows.db", lambda p: split_of(p, config)
        )
        try:
            out = Examples(filtered=Counter(disk.filtered))
            query = "SELECT kind, prompt, actor, payload FROM rows WHERE capped = 0 ORDER BY ord"
            for kind, prompt_sha256, actor, payload in disk.db.execute(query).fetchall():
                row = json.loads(payload)
                tags = {t["key"]: t["value"] for t in row["tags"]}
                if kind == "pairs":
                    out.pairs.append(PairExample(
                        row["prompt"], row["chosen"], row["rejected"], row["source"],
                        tuple(row["event_ids"]), prompt_sha256, tags, actor,
                    ))  # fmt: skip
                else:
                    out.kto.append(KTOExample(
                        row["prompt"], row["completion"], bool(row["label"]), row["event_id"],
                        prompt_sha256, tags, actor,
                    ))  # fmt: skip
            return out
        finally:
            disk.close()
