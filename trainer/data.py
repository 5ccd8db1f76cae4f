"""Reading training rows: a snapshot directory, or a JSONL/JSON/parquet file or directory.

Rows use TRL's column names. Pairs: ``{prompt, chosen, rejected}``. Unpaired (KTO):
``{prompt, completion, label}`` with ``label`` true for desirable. ``prompt`` is a string or
a list of ``{role, content}`` chat messages.

A snapshot (docs/ARCHITECTURE.md, "Contracts") is a directory with ``manifest.json`` and
``pairs/{train,heldout}.parquet`` and ``kto/{train,heldout}.parquet``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feedback.manifest import SnapshotManifest
from trainer.logprobs import Prompt


@dataclass(frozen=True)
class PairRow:
    prompt: Prompt
    chosen: str
    rejected: str


@dataclass(frozen=True)
class UnpairedRow:
    prompt: Prompt
    completion: str
    desirable: bool


class DataError(ValueError):
    """Rows that cannot be used for the requested method; the message says which and why."""


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(path).to_pylist())
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        loaded = json.loads(path.read_text())
        return loaded if isinstance(loaded, list) else [loaded]
    raise DataError(f"{path}: unsupported file type (want .jsonl, .json or .parquet)")


def is_snapshot(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def read_rows(path: Path, *, kind: str = "pairs", split: str = "train") -> list[dict[str, Any]]:
    """Raw rows from a file, a directory of files, or one split of a snapshot."""
    if is_snapshot(path):
        part = path / kind / f"{split}.parquet"
        return _read_file(part) if part.is_file() else []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in {".jsonl", ".json", ".parquet"})
        return [row for f in files for row in _read_file(f)]
    return _read_file(path)


def _prompt(row: dict[str, Any], where: str) -> Prompt:
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    raise DataError(f"{where}: 'prompt' must be a non-empty string or list of chat messages")


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key!r} must be a non-empty string")
    return value


def to_pairs(rows: list[dict[str, Any]]) -> list[PairRow]:
    return [
        PairRow(
            _prompt(r, f"row {i}"), _text(r, "chosen", f"row {i}"), _text(r, "rejected", f"row {i}")
        )
        for i, r in enumerate(rows)
    ]


def to_unpaired(rows: list[dict[str, Any]]) -> list[UnpairedRow]:
    """KTO rows; paired rows are split into a desirable and an undesirable row each."""
    out: list[UnpairedRow] = []
    for i, r in enumerate(rows):
        where = f"row {i}"
        if "chosen" in r:
            out.append(UnpairedRow(_prompt(r, where), _text(r, "chosen", where), True))
            out.append(UnpairedRow(_prompt(r, where), _text(r, "rejected", where), False))
        else:
            label = r.get("label")
            if not isinstance(label, bool):
                raise DataError(f"{where}: 'label' must be true or false")
            out.append(UnpairedRow(_prompt(r, where), _text(r, "completion", where), label))
    return out


def row_tags(row: dict[str, Any]) -> dict[str, str]:
    """A row's tags as a dict: a snapshot stores ``[{key, value}, ...]``, a JSONL row may give a
    mapping; rows from before tags were kept have none."""
    tags = row.get("tags") or {}
    if isinstance(tags, dict):
        return {str(k): str(v) for k, v in tags.items()}
    return {str(t["key"]): str(t["value"]) for t in tags}


def rows_sha256(rows: list[dict[str, Any]]) -> str:
    """Content hash of rows (order-sensitive, key-order-insensitive)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def snapshot_sha256(path: Path) -> str | None:
    """The content hash a snapshot's manifest declares, if ``path`` is a snapshot."""
    if not is_snapshot(path):
        return None
    return SnapshotManifest.load(path).sha256
