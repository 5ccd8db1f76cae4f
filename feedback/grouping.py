"""The dataset rules of :mod:`feedback.dataset`, applied to a store of any size: the builder.

A year of a large deployment's feedback does not fit in memory, so the rules run with memory
that does not grow with the store: events stream in (any order), each becomes a vote in a
temporary SQLite database on disk, and the sorting, the grouping by reply or question, the
caps and the splits run there. Python holds one group of votes at a time (the votes on one
reply or one pair), and rows leave as iterators in the snapshot's order.

The tests keep a plain in-memory reading of the same rules as an oracle
(``tests/feedback/dataset_oracle.py``) and compare the two on random streams, row for row.

Order keys: an event's place in the rules' order is ``(occurred_at, event_id)``, kept as one
string (UTC time with microseconds, NUL, the id). Pairs mined from ratings arrive after every
other pair (``~`` sorts after digits), in the order of their prompt's first KTO row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import groupby, islice, product
from pathlib import Path
from typing import Any

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

_SCHEMA = """
CREATE TABLE votes (kind TEXT, grp TEXT, ord TEXT, voter TEXT, side TEXT, payload TEXT);
CREATE TABLE rows (kind TEXT, ord TEXT, prompt TEXT, actor TEXT, split TEXT, label INTEGER,
                   source TEXT, capped INTEGER DEFAULT 0, payload TEXT);
"""
_CHUNK = 2000  # votes or rows per insert, and per fetch


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def order_key(event: Event) -> str:
    return (
        event.occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "\0" + event.event_id
    )


def _tag_rows(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in sorted(tags.items())]


def pair_row(p: PairExample) -> dict[str, Any]:
    """A pair as a snapshot row (``feedback.snapshot.PAIR_SCHEMA``)."""
    return {
        "prompt": p.prompt,
        "chosen": p.chosen,
        "rejected": p.rejected,
        "source": p.source,
        "event_ids": list(p.event_ids),
        "tags": _tag_rows(p.tags),
    }


def kto_row(k: KTOExample) -> dict[str, Any]:
    """A KTO example as a snapshot row (``feedback.snapshot.KTO_SCHEMA``)."""
    return {
        "prompt": k.prompt,
        "completion": k.completion,
        "label": k.label,
        "event_id": k.event_id,
        "tags": _tag_rows(k.tags),
    }


@dataclass
class EventStats:
    """What the snapshot's manifest says about the events it read."""

    count: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    first_occurred: datetime | None = None
    last_occurred: datetime | None = None
    corrections: Counter[str] = field(default_factory=Counter)  # changed drafts per served_adapter

    def add(self, seq: int, event: Event) -> None:
        self.count += 1
        if isinstance(event, EditEvent) and not unchanged_send(event):
            self.corrections[event.served_adapter or ""] += 1
        self.first_seq = seq if self.first_seq is None else min(self.first_seq, seq)
        self.last_seq = seq if self.last_seq is None else max(self.last_seq, seq)
        at = event.occurred_at
        if self.first_occurred is None or at < self.first_occurred:
            self.first_occurred = at
        if self.last_occurred is None or at >= self.last_occurred:  # ties: the last read
            self.last_occurred = at


@dataclass
class DiskRows:
    """Training rows built on disk; read them with :meth:`rows` (``kind``: pairs | kto)."""

    db: sqlite3.Connection
    filtered: Counter[str] = field(default_factory=Counter)
    stats: EventStats = field(default_factory=EventStats)

    def rows(self, kind: str, split: str) -> Iterator[dict[str, Any]]:
        cursor = self.db.execute(
            "SELECT payload FROM rows WHERE kind = ? AND split = ? AND capped = 0 ORDER BY ord",
            (kind, split),
        )
        while chunk := cursor.fetchmany(_CHUNK):
            for (payload,) in chunk:
                yield json.loads(payload)

    def count(self, kind: str, split: str) -> int:
        return int(self.db.execute(
            "SELECT count(*) FROM rows WHERE kind = ? AND split = ? AND capped = 0", (kind, split)
        ).fetchone()[0])  # fmt: skip

    def pair_sources(self) -> dict[str, int]:
        found = dict(self.db.execute(
            "SELECT source, count(*) FROM rows WHERE kind = 'pairs' AND capped = 0 GROUP BY source"
        ).fetchall())  # fmt: skip
        return {s: int(found.get(s, 0)) for s in ("edit", "comparison", "mined")}

    def desirable_train(self) -> int:
        return int(self.db.execute(
            "SELECT count(*) FROM rows WHERE kind = 'kto' AND split = 'train' AND capped = 0"
            " AND label = 1"
        ).fetchone()[0])  # fmt: skip

    def actor_counts(self) -> Iterator[tuple[str, int, int]]:
        """(actor or the unattributed bucket, rows, held-out rows), most rows first, then by
        name: the order the manifest's top suppliers are listed in."""
        cursor = self.db.execute(
            "SELECT CASE WHEN actor = '' THEN ? ELSE actor END AS who, count(*) AS n,"
            " sum(split = 'heldout') FROM rows WHERE capped = 0 GROUP BY who"
            " ORDER BY n DESC, who",
            (UNATTRIBUTED,),
        )
        while chunk := cursor.fetchmany(_CHUNK):
            yield from chunk

    def close(self) -> None:
        self.db.close()


def build_rows_on_disk(
    events: Iterable[tuple[int, Event]],
    config: DatasetConfig,
    now: datetime,
    work: Path,
    split_of: Any,
) -> DiskRows:
    """Apply the dataset rules to ``(seq, event)`` pairs, spilling to ``work`` (a SQLite file).
    ``split_of(prompt_sha256)`` names a row's split."""
    db = sqlite3.connect(work, isolation_level=None)
    for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-16000"):
        db.execute(f"PRAGMA {pragma}")
    db.executescript(_SCHEMA)
    out = DiskRows(db)
    db.execute("BEGIN")
    _spill_votes(events, config, now, out)
    db.execute("CREATE INDEX votes_by_group ON votes (kind, grp, ord)")
    _settle("r", "kto", "label", "example", out, split_of)
    if config.mine_rating_pairs:
        _mine_pairs(config, out)
    _settle("p", "pairs", "pair", "pair", out, split_of)
    _apply_caps(config, out)
    db.execute("CREATE INDEX rows_out ON rows (kind, split, capped, ord)")
    db.execute("COMMIT")
    return out


Vote = tuple[str, str, str, str, str, str]  # kind, group, order, voter, side, payload


def _pair_vote(
    pair: PairExample, ord_: str, config: DatasetConfig, filtered: Counter[str]
) -> Vote | None:
    """A pair candidate as a vote on its question, or None when a rule drops it."""
    chosen, rejected = normalize(pair.chosen), normalize(pair.rejected)
    if chosen == rejected:
        filtered["trivial_edit"] += 1
        return None
    if words(pair.chosen) > config.max_length_ratio * max(1, words(pair.rejected)):
        filtered["length_ratio"] += 1
        return None
    low, high = sorted((chosen, rejected))
    meta = {"prompt_sha256": pair.prompt_sha256, "actor": pair.actor, "row": pair_row(pair)}
    return ("p", _key(pair.prompt_sha256, low, high), ord_, pair.voter, _key(chosen),
            json.dumps(meta, ensure_ascii=False))  # fmt: skip


def _spill_votes(
    events: Iterable[tuple[int, Event]], config: DatasetConfig, now: datetime, out: DiskRows
) -> None:
    oldest = now - timedelta(days=config.recency_days) if config.recency_days else None
    batch: list[Vote] = []
    for seq, ev in events:
        out.stats.add(seq, ev)
        ord_ = order_key(ev)
        if oldest is not None and ev.occurred_at < oldest:
            out.filtered["outside_window"] += 1
            continue
        if any(len(t) > config.max_chars for t in texts(ev)):
            out.filtered["too_long"] += 1
            continue
        if isinstance(ev, EditEvent) and unchanged_send(ev):
            out.filtered["trivial_edit"] += 1
            ev = as_thumbs_up(ev)
        if isinstance(ev, RatingEvent):
            pid, actor = prompt_id(ev), actor_of(ev)
            kto = KTOExample(messages(ev), ev.completion, ev.rating == "up", ev.event_id, pid,
                             dict(ev.tags), actor)  # fmt: skip
            meta = {"prompt_sha256": pid, "actor": actor, "row": kto_row(kto)}
            batch.append(("r", _key(pid, normalize(ev.completion)), ord_, voter(ev), ev.rating,
                          json.dumps(meta, ensure_ascii=False)))  # fmt: skip
        else:
            vote = _pair_vote(pair_from(ev), ord_, config, out.filtered)
            if vote is not None:
                batch.append(vote)
        if len(batch) >= _CHUNK:
            out.db.executemany("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?)", batch)
            batch.clear()
    out.db.executemany("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?)", batch)


def _groups(db: sqlite3.Connection, kind: str) -> Iterator[list[tuple[str, str, str, str]]]:
    """The votes of one kind, one group at a time, each in arrival order."""
    cursor = db.cursor()  # its own cursor: the caller inserts while this one reads
    cursor.execute(
        "SELECT grp, ord, voter, side, payload FROM votes WHERE kind = ? ORDER BY grp, ord",
        (kind,),
    )

    def stream() -> Iterator[tuple[str, str, str, str, str]]:
        while chunk := cursor.fetchmany(_CHUNK):
            yield from chunk

    for _, members in groupby(stream(), key=lambda v: v[0]):
        yield [v[1:] for v in members]


def _settle(
    kind: str, row_kind: str, conflict: str, row: str, out: DiskRows, split_of: Any
) -> None:
    """Majority per group (:func:`feedback.dataset.majority`); the first winner becomes a row
    placed at its group's first vote."""
    batch = []
    for votes in _groups(out.db, kind):
        winners = majority(votes, lambda v: v[1], lambda v: v[2], out.filtered, conflict, row)
        if not winners:
            continue
        meta = json.loads(winners[0][3])
        payload = meta["row"]
        prompt = meta["prompt_sha256"]
        label = int(payload["label"]) if row_kind == "kto" else None
        source = payload.get("source")
        batch.append((row_kind, votes[0][0], prompt, meta["actor"], split_of(prompt), label,
                      source, json.dumps(payload, ensure_ascii=False)))  # fmt: skip
        if len(batch) >= _CHUNK:
            _insert_rows(out.db, batch)
            batch.clear()
    _insert_rows(out.db, batch)


def _insert_rows(db: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
    db.executemany(
        "INSERT INTO rows (kind, ord, prompt, actor, split, label, source, payload)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        batch,
    )


def _mine_pairs(config: DatasetConfig, out: DiskRows) -> None:
    """An up and a down on one prompt's KTO rows → pairs (up = chosen), at most
    ``max_mined_pairs_per_prompt`` per prompt, voted on like every other pair."""
    cursor = out.db.cursor()
    cursor.execute(
        "SELECT prompt, ord, actor, label, payload FROM rows WHERE kind = 'kto'"
        " ORDER BY prompt, ord"
    )

    def stream() -> Iterator[tuple[str, str, str, int, str]]:
        while chunk := cursor.fetchmany(_CHUNK):
            yield from chunk

    batch = []
    for prompt, members in groupby(stream(), key=lambda r: r[0]):
        examples = list(members)
        first = examples[0][1]
        ups = [e for e in examples if e[3]]
        downs = [e for e in examples if not e[3]]
        pairs = islice(product(ups, downs), config.max_mined_pairs_per_prompt)
        for i, (up, down) in enumerate(pairs):
            u, d = json.loads(up[4]), json.loads(down[4])
            tags = {t["key"]: t["value"] for t in u["tags"]}
            mined = PairExample(u["prompt"], u["completion"], d["completion"], "mined",
                                (u["event_id"], d["event_id"]), prompt, tags, up[2])  # fmt: skip
            vote = _pair_vote(mined, f"~{first}\0{i:09d}", config, out.filtered)
            if vote is not None:
                batch.append(vote)
    out.db.executemany("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?)", batch)


def _apply_caps(config: DatasetConfig, out: DiskRows) -> None:
    """At most ``max_rows_per_actor`` rows per actor (events without one are not capped), then
    ``max_rows_per_prompt`` per prompt, per kind, the most recent kept."""
    for name, column, limit in (
        ("actor_cap", "actor", config.max_rows_per_actor),
        ("prompt_cap", "prompt", config.max_rows_per_prompt),
    ):
        if limit is None:
            continue
        changed = out.db.execute(
            f"UPDATE rows SET capped = 1 WHERE rowid IN (SELECT rowid FROM ("
            f" SELECT rowid, row_number() OVER (PARTITION BY kind, {column} ORDER BY ord DESC)"
            f" AS rank FROM rows WHERE capped = 0 AND {column} != '') WHERE rank > ?)",
            (limit,),
        ).rowcount
        out.filtered[name] += changed
