"""Reference log-probs kept across refreshes, one row per (base model, token ids).

The reference is the frozen SFT model, so a response's reference log-prob depends only on
the base weights and on the exact tokens scored — never on the adapter being trained, and
never on which other rows are in the snapshot. A refresh that sees 10% new rows therefore
runs the reference over those 10% only (TRL's ``precompute_ref_log_probs`` keys its cache on
the whole dataset, so one new row recomputes everything).

The key is ``sha256(model identity, prompt ids, response ids)``. Token ids already encode the
tokenizer, the chat template and any truncation, so a change to any of those is a new key,
never a stale hit. The model identity names the weights' content and how they were run
(device type and precision), since a bf16 GPU pass and a float32 CPU pass differ in the
last digits and the step-0 ``log 2`` check is tighter than that.

Storage: one SQLite file on the data volume (WAL, so ranks of a data-parallel run can read
and fill it at the same time). Without a path the cache lives in memory for one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from feedback.base import until_settled
from trainer.logprobs import Encoded

ComputeFn = Callable[[Any, list[Encoded], int, int], Tensor]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reference_logps (
    key BLOB PRIMARY KEY,
    logp REAL NOT NULL
) WITHOUT ROWID
"""


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content, read in 4 MiB chunks (weight files run to GBs)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_identity(model_dir: Path, device_type: str, dtype: str = "float32") -> str:
    """A name for the base weights' content and how they run.

    The content hash of the weight files is memoised next to them by (name, size, mtime), so
    hashing a multi-GB base happens once, not on every refresh.
    """
    parts = []
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = path.stat()
        memo = model_dir / f".{path.name}.sha256"
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        digest = None
        if memo.is_file():
            recorded = memo.read_text().split()
            if len(recorded) == 2 and recorded[0] == stamp:
                digest = recorded[1]
        if digest is None:
            digest = file_sha256(path)
            with contextlib.suppress(OSError):  # read-only model directory: hash next time
                memo.write_text(f"{stamp} {digest}\n")
        parts.append((path.name, digest))
    if not parts:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors or *.bin weight files")
    return json.dumps({"weights": parts, "device": device_type, "dtype": dtype})


def open_cache_file(path: Path, timeout: float = 60.0) -> sqlite3.Connection:
    """The cache file, in WAL mode with its table, however many processes open it at once (the
    ranks of a run, concurrent refreshes on one base): see :func:`feedback.base.until_settled`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=timeout)

    def create() -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(_SCHEMA)
        db.commit()

    try:
        until_settled(create, sqlite3.OperationalError, timeout_s=timeout)
    except sqlite3.OperationalError:
        db.close()
        raise
    return db


@dataclass
class CacheStats:
    """How many reference log-probs a run looked up, and how many it had to compute."""

    hits: int = 0
    computed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "computed": self.computed}


class ReferenceCache:
    """Reference log-probs by (model identity, token ids); SQLite file or in memory."""

    def __init__(
        self,
        path: Path | None,
        identity: str,
        found_everywhere: Callable[[list[bool]], list[bool]] | None = None,
    ) -> None:
        # Under FSDP every rank must run the same forwards, but ranks read the file at different
        # moments while other runs (and the ranks themselves) write to it, so they can find
        # different rows. ``found_everywhere`` turns this rank's hits into the rows *every* rank
        # found (a collective); the others are computed by all ranks alike.
        self.found_everywhere = found_everywhere
        self.identity = identity.encode()
        self.stats = CacheStats()
        self._memory: dict[bytes, float] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = open_cache_file(path)

    def key(self, example: Encoded) -> bytes:
        h = hashlib.sha256(self.identity)
        for ids in (example.prompt_ids, example.response_ids):
            h.update(struct.pack("<I", len(ids)))
            h.update(struct.pack(f"<{len(ids)}I", *ids))
        return h.digest()

    def _lookup(self, keys: Sequence[bytes]) -> dict[bytes, float]:
        if self._db is None:
            return {k: self._memory[k] for k in keys if k in self._memory}
        found: dict[bytes, float] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite caps the number of bound variables
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(
                    f"SELECT key, logp FROM reference_logps WHERE key IN ({marks})", chunk
                ).fetchall()
            )
        return found

    def _store(self, items: Iterable[tuple[bytes, float]]) -> None:
        if self._db is None:
            self._memory.update(items)
            return
        with self._db:  # one transaction
            self._db.executemany(
                "INSERT OR IGNORE INTO reference_logps (key, logp) VALUES (?, ?)", list(items)
            )

    def logps(
        self,
        model: Any,
        examples: Sequence[Encoded],
        compute: ComputeFn,
        pad_id: int,
        batch_size: int,
    ) -> Tensor:
        """Reference log-probs of ``examples`` ``(M,)``, computing only the unseen ones."""
        keys = [self.key(e) for e in examples]
        known = self._lookup(keys)
        if self.found_everywhere is not None:
            agreed = self.found_everywhere([k in known for k in keys])
            known = {k: known[k] for k, found in zip(keys, agreed, strict=True) if found}
        self.stats.hits += sum(1 for k in keys if k in known)
        todo = {k: e for k, e in zip(keys, examples, strict=True) if k not in known}
        missing = list(todo)
        if missing:
            fresh = compute(model, list(todo.values()), pad_id, batch_size)
            computed = dict(zip(missing, fresh.tolist(), strict=True))
            self._store(computed.items())
            known |= computed
            self.stats.computed += len(missing)
        return torch.tensor([known[k] for k in keys], dtype=torch.float32)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
