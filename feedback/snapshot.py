"""Dataset snapshots: parquet files a trainer (or ``datasets``/TRL) can load, plus a manifest.

Layout of a snapshot directory::

    manifest.json          sha256 of the content, counts, filters, event range, build config
    pairs/train.parquet    prompt, chosen, rejected (+ source, event_ids, tags)
    pairs/heldout.parquet
    kto/train.parquet      prompt, completion, label (+ event_id, tags)
    kto/heldout.parquet

``prompt`` is a list of ``{role, content}`` messages. The sha256 covers the rows only (not the
build time or file bytes), so the same events under the same rules give the same hash, and a
refresh whose snapshot hash equals the last trained one can be skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feedback.config import DatasetConfig
from feedback.dataset import (
    FILTERS,
    UNATTRIBUTED,
    is_heldout,
    kto_balance,
)
from feedback.grouping import build_rows_on_disk
from feedback.manifest import (
    MANIFEST_FORMAT,
    ActorShare,
    ActorShares,
    EventRange,
    KtoBalance,
    SnapshotCounts,
    SnapshotManifest,
)
from feedback.store import FeedbackStore

# The events' tags (category, expected facts, ...) as key/value rows: ``datasets`` has no map type.
TAGS = pa.list_(pa.struct([("key", pa.string()), ("value", pa.string())]))
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
PAIR_SCHEMA = pa.schema(
    [
        ("prompt", pa.list_(MESSAGE)),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("source", pa.string()),
        ("event_ids", pa.list_(pa.string())),
        ("tags", TAGS),
    ]
)
KTO_SCHEMA = pa.schema(
    [
        ("prompt", pa.list_(MESSAGE)),
        ("completion", pa.string()),
        ("label", pa.bool_()),
        ("event_id", pa.string()),
        ("tags", TAGS),
    ]
)
SPLITS = ("train", "heldout")
ROW_GROUP = 2_000  # rows per parquet row group (and in memory at once while writing)
PUBLIC_SALT = "alignd-v1"


def split_salt(config: DatasetConfig) -> str:
    """The configured secret, or the public default (predictable: library use and tests; the
    daemon always sets a secret one, see ``daemon.config.with_split_salt``)."""
    return config.split_salt.get_secret_value() if config.split_salt else PUBLIC_SALT


def split_of(prompt_sha256: str, config: DatasetConfig) -> str:
    """``train`` or ``heldout``: stable per (normalised) prompt under one salt."""
    held = is_heldout(prompt_sha256, config.heldout_fraction, split_salt(config))
    return "heldout" if held else "train"


def shares_of(ranked: Iterable[tuple[str, int, int]], top: int = 5) -> ActorShares:
    """:class:`ActorShares` from ``(actor, rows, held-out rows)``, most rows first (ties by
    name), read once: memory does not grow with the number of actors."""
    distinct = total = total_heldout = unattributed = largest = largest_heldout = 0
    leaders: list[tuple[str, int, int]] = []
    for who, n, held in ranked:
        distinct += 1
        total, total_heldout = total + n, total_heldout + held
        largest, largest_heldout = max(largest, n), max(largest_heldout, held)
        if who == UNATTRIBUTED:
            unattributed = n
        if len(leaders) < top:
            leaders.append((who, n, held))

    def share(n: int, of: int) -> float:
        return n / of if of else 0.0

    def named(who: str) -> tuple[str, str]:
        if who == UNATTRIBUTED:
            return who, ""
        return hashlib.sha256(who.encode()).hexdigest()[:12], who.partition(":")[0]

    return ActorShares(
        distinct=distinct,
        unattributed_rows=unattributed,
        largest_share=share(largest, total),
        largest_heldout_share=share(largest_heldout, total_heldout),
        top=[
            ActorShare(
                actor=named(who)[0],
                kind=named(who)[1],
                rows=n,
                heldout_rows=held,
                share=share(n, total),
                heldout_share=share(held, total_heldout),
            )
            for who, n, held in leaders
        ],
    )


def _row_bytes(row: dict[str, Any]) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def _chunks(rows: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_rows(
    out_dir: Path,
    rows: Callable[[str, str], Iterable[dict[str, Any]]],
    *,
    filtered: Counter[str],
    actors: ActorShares,
    event_range: EventRange,
    config: DatasetConfig,
    built_at: datetime,
) -> SnapshotManifest:
    """Stream ``rows(kind, split)`` into parquet row groups of ``ROW_GROUP`` rows while hashing
    them (per kind and split a "kind/split" line, then each row as sorted-key JSON); then the
    manifest; then the rename."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    digest = hashlib.sha256()
    counts: dict[str, dict[str, int]] = {"pairs": {}, "kto": {}}
    sources: Counter[str] = Counter()
    desirable = 0
    try:
        for kind, schema in (("pairs", PAIR_SCHEMA), ("kto", KTO_SCHEMA)):
            (staging / kind).mkdir()
            for split in SPLITS:
                digest.update(f"{kind}/{split}\n".encode())
                n = 0
                with pq.ParquetWriter(staging / kind / f"{split}.parquet", schema) as writer:
                    for chunk in _chunks(rows(kind, split), ROW_GROUP):
                        for row in chunk:
                            digest.update(_row_bytes(row))
                            if kind == "pairs":
                                sources[row["source"]] += 1
                            elif split == "train":
                                desirable += bool(row["label"])
                        writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                        n += len(chunk)
                counts[kind][split] = n
        kto_train = counts["kto"]["train"]
        weight_d, weight_u = kto_balance(desirable, kto_train - desirable)
        manifest = SnapshotManifest(
            format=MANIFEST_FORMAT,
            sha256=digest.hexdigest(),
            counts=SnapshotCounts.model_validate(counts),
            pair_sources={s: sources.get(s, 0) for s in ("edit", "comparison", "mined")},
            filtered={name: filtered.get(name, 0) for name in FILTERS},
            kto_balance=KtoBalance(
                desirable=desirable,
                undesirable=kto_train - desirable,
                desirable_weight=weight_d,
                undesirable_weight=weight_u,
            ),
            events=event_range,
            actors=actors,
            split_salt="secret" if config.split_salt else "public-default",
            config=config,
            built_at=built_at.isoformat(),
        )
        with (staging / "manifest.json").open("w") as f:
            json.dump(manifest.model_dump(mode="json"), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_snapshot(
    store: FeedbackStore, out_dir: Path, config: DatasetConfig, *, now: datetime | None = None
) -> SnapshotManifest:
    """Read every stored event, build the rows, write the snapshot — in memory that does not
    grow with the store: events stream from the store in chunks, the rules' sorting, grouping
    and caps run in a temporary SQLite file next to the snapshot (:mod:`feedback.grouping`),
    and rows stream into parquet row groups."""
    now = now or datetime.now(UTC)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}-work-", dir=out_dir.parent) as work:
        disk = build_rows_on_disk(
            ((s.seq, s.event) for s in store.iter_events()),
            config,
            now,
            Path(work) / "rows.db",
            lambda prompt: split_of(prompt, config),
        )
        try:
            stats = disk.stats
            event_range = EventRange(
                count=stats.count,
                first_seq=stats.first_seq,
                last_seq=stats.last_seq,
                first_occurred_at=stats.first_occurred.isoformat()
                if stats.first_occurred
                else None,
                last_occurred_at=stats.last_occurred.isoformat() if stats.last_occurred else None,
                corrections=dict(sorted(stats.corrections.items())),
            )
            return write_rows(
                out_dir,
                disk.rows,
                filtered=disk.filtered,
                actors=shares_of(disk.actor_counts()),
                event_range=event_range,
                config=config,
                built_at=now,
            )
        finally:
            disk.close()
