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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from feedback.config import DatasetConfig
from feedback.dataset import (
    FILTERS,
    UNATTRIBUTED,
    Examples,
    KTOExample,
    PairExample,
    build_examples,
    is_heldout,
    kto_balance,
)
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
PUBLIC_SALT = "alignd-v1"


def _tag_rows(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in sorted(tags.items())]


def _pair_row(p: PairExample) -> dict[str, Any]:
    return {
        "prompt": p.prompt,
        "chosen": p.chosen,
        "rejected": p.rejected,
        "source": p.source,
        "event_ids": list(p.event_ids),
        "tags": _tag_rows(p.tags),
    }


def _kto_row(k: KTOExample) -> dict[str, Any]:
    return {
        "prompt": k.prompt,
        "completion": k.completion,
        "label": k.label,
        "event_id": k.event_id,
        "tags": _tag_rows(k.tags),
    }


def split_salt(config: DatasetConfig) -> str:
    """The configured secret, or the public default (predictable: library use and tests; the
    daemon always sets a secret one, see ``daemon.config.with_split_salt``)."""
    return config.split_salt.get_secret_value() if config.split_salt else PUBLIC_SALT


def split_of(prompt_sha256: str, config: DatasetConfig) -> str:
    """``train`` or ``heldout``: stable per (normalised) prompt under one salt."""
    held = is_heldout(prompt_sha256, config.heldout_fraction, split_salt(config))
    return "heldout" if held else "train"


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
    total, total_heldout = sum(rows.values()), sum(heldout.values())

    def share(n: int, of: int) -> float:
        return n / of if of else 0.0

    def named(who: str) -> tuple[str, str]:
        if who == UNATTRIBUTED:
            return who, ""
        return hashlib.sha256(who.encode()).hexdigest()[:12], who.partition(":")[0]

    return ActorShares(
        distinct=len(rows),
        unattributed_rows=rows[UNATTRIBUTED],
        largest_share=share(max(rows.values(), default=0), total),
        largest_heldout_share=share(max(heldout.values(), default=0), total_heldout),
        top=[
            ActorShare(
                actor=named(who)[0],
                kind=named(who)[1],
                rows=n,
                heldout_rows=heldout[who],
                share=share(n, total),
                heldout_share=share(heldout[who], total_heldout),
            )
            for who, n in sorted(rows.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        ],
    )


def split_rows(
    examples: Examples, config: DatasetConfig
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{"pairs": {"train": [...], "heldout": [...]}, "kto": {...}}``, split by prompt hash."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {
        "pairs": {s: [] for s in SPLITS},
        "kto": {s: [] for s in SPLITS},
    }

    for p in examples.pairs:
        out["pairs"][split_of(p.prompt_sha256, config)].append(_pair_row(p))
    for k in examples.kto:
        out["kto"][split_of(k.prompt_sha256, config)].append(_kto_row(k))
    return out


def content_sha256(rows: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    digest = hashlib.sha256()
    for kind in ("pairs", "kto"):
        for split in SPLITS:
            digest.update(f"{kind}/{split}\n".encode())
            for row in rows[kind][split]:
                digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def write_snapshot(
    examples: Examples,
    out_dir: Path,
    *,
    config: DatasetConfig,
    event_range: EventRange,
    built_at: datetime | None = None,
) -> SnapshotManifest:
    """Write the snapshot atomically (temp dir, then rename) and return its manifest."""
    rows = split_rows(examples, config)
    kto_train = rows["kto"]["train"]
    n_desirable = sum(r["label"] for r in kto_train)
    weight_d, weight_u = kto_balance(n_desirable, len(kto_train) - n_desirable)
    manifest = SnapshotManifest(
        format=MANIFEST_FORMAT,
        sha256=content_sha256(rows),
        counts=SnapshotCounts.model_validate(
            {kind: {s: len(rows[kind][s]) for s in SPLITS} for kind in rows}
        ),
        pair_sources={
            s: sum(1 for p in examples.pairs if p.source == s)
            for s in ("edit", "comparison", "mined")
        },
        filtered={name: examples.filtered.get(name, 0) for name in FILTERS},
        kto_balance=KtoBalance(
            desirable=n_desirable,
            undesirable=len(kto_train) - n_desirable,
            desirable_weight=weight_d,
            undesirable_weight=weight_u,
        ),
        events=event_range,
        actors=actor_shares(examples, config),
        split_salt="secret" if config.split_salt else "public-default",
        config=config,
        built_at=(built_at or datetime.now(UTC)).isoformat(),
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for kind, schema in (("pairs", PAIR_SCHEMA), ("kto", KTO_SCHEMA)):
            (staging / kind).mkdir()
            for split in SPLITS:
                table = pa.Table.from_pylist(rows[kind][split], schema=schema)
                pq.write_table(table, staging / kind / f"{split}.parquet")
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
    """Read every stored event, build the rows, write the snapshot."""
    now = now or datetime.now(UTC)
    stored = list(store.iter_events())
    events = [s.event for s in stored]
    occurred = sorted(e.occurred_at for e in events)
    event_range = EventRange(
        count=len(stored),
        first_seq=stored[0].seq if stored else None,
        last_seq=stored[-1].seq if stored else None,
        first_occurred_at=occurred[0].isoformat() if occurred else None,
        last_occurred_at=occurred[-1].isoformat() if occurred else None,
    )
    return write_snapshot(
        build_examples(events, config, now),
        out_dir,
        config=config,
        event_range=event_range,
        built_at=now,
    )
