"""The training view of an incremental refresh: what is new since another snapshot, plus a
bounded replay sample of what is not.

A refresh that warm-starts from the active adapter has already learned that adapter's training
rows. :func:`incremental_view` writes a snapshot-shaped directory whose **train** splits hold
the rows of ``current`` that ``previous`` (the active adapter's snapshot) did not have, plus
``replay_ratio`` older rows per new row, at most ``replay_rows`` (a seeded uniform sample of
the rows it did have, kept in snapshot order): the cost follows the new feedback. And
whose **held-out** splits are ``current``'s own, so evaluation and the gate still see every
held-out row, old ones included. The manifest is ``current``'s: the view is part of that
snapshot, and the run's dataset hash stays the snapshot's.

Rows are compared by the hash the snapshot's sha256 is built from, streamed in record batches:
memory holds one digest per previous training row (16 bytes each) and the replay reservoir.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

KINDS = ("pairs", "kto")


@dataclass
class IncrementStats:
    """Train rows per kind: new since the previous snapshot, and replayed from it."""

    new: dict[str, int] = field(default_factory=dict)
    replayed: dict[str, int] = field(default_factory=dict)
    previous: dict[str, int] = field(default_factory=dict)  # rows the previous one had

    def describe(self) -> str:
        return ", ".join(
            f"{kind}: {self.new.get(kind, 0):,} new + {self.replayed.get(kind, 0):,} replayed "
            f"of {self.previous.get(kind, 0):,} learned"
            for kind in KINDS
        )


def _digest(row: dict[str, Any]) -> bytes:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).digest()[
        :16
    ]


def _rows(path: Path) -> Any:
    if not path.is_file():
        return
    for batch in pq.ParquetFile(path).iter_batches(batch_size=2000):
        yield from batch.to_pylist()


def incremental_view(
    current: Path,
    previous: Path,
    out: Path,
    *,
    replay_rows: int,
    seed: str,
    replay_ratio: float = 1.0,
) -> IncrementStats:
    """Write the training view of ``current`` against ``previous`` into ``out`` (see above)."""
    stats = IncrementStats()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(current / "manifest.json", out / "manifest.json")
    rng = random.Random(seed)
    for kind in KINDS:
        (out / kind).mkdir()
        heldout = current / kind / "heldout.parquet"
        if heldout.is_file():
            try:
                os.link(heldout, out / kind / "heldout.parquet")  # snapshots are immutable
            except OSError:  # another filesystem
                shutil.copy2(heldout, out / kind / "heldout.parquet")
        learned = {_digest(row) for row in _rows(previous / kind / "train.parquet")}
        stats.previous[kind] = len(learned)
        train = current / kind / "train.parquet"
        if not train.is_file():
            continue
        schema = pq.read_schema(train)
        new: list[tuple[int, dict[str, Any]]] = []
        reservoir: list[tuple[int, dict[str, Any]]] = []
        seen_old = 0
        for i, row in enumerate(_rows(train)):
            if _digest(row) not in learned:
                new.append((i, row))
                continue
            seen_old += 1  # reservoir sampling: each old row kept with chance replay/seen
            if len(reservoir) < replay_rows:
                reservoir.append((i, row))
            else:
                j = rng.randrange(seen_old)
                if j < replay_rows:
                    reservoir[j] = (i, row)
        # a uniform sample of a uniform sample is uniform: keep as many as the new rows call for
        rng.shuffle(reservoir)
        reservoir = reservoir[: min(replay_rows, math.ceil(replay_ratio * len(new)))]
        rows = [row for _, row in sorted(new + reservoir, key=lambda item: item[0])]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / kind / "train.parquet")
        stats.new[kind], stats.replayed[kind] = len(new), len(reservoir)
    return stats
