"""What an evaluation computes once per model and keeps: greedy replies, factuality, drift.

A *model* here is the base (its content identity, :func:`trainer.refcache.model_identity`) with
at most one adapter (the sha256 of its weights, :func:`adapter_identity`). Greedy decoding and
the scoring passes are deterministic for a model, so their results are the same every time it
is evaluated:

- the reference (no adapter) never changes: its replies to the held-out prompts of every round,
  the retain set and the anchor's prompts, and its factuality, are computed once per base;
- an adapter is evaluated twice in a continuous loop — as the candidate of the refresh that
  trained it, then as the incumbent of the next one — so the incumbent's replies, factuality
  and drift are read from the candidate's evaluation instead of being recomputed (on the demo's
  CPU about a minute of every incremental refresh: 286–302 s of evaluation became 227–231 s).

Entries live as JSON files in ``cache_dir`` (beside the reference log-prob cache; None: nothing
is kept). Replies are keyed per prompt, so a round whose held-out split grew generates only the
new prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from trainer.generation import generate
from trainer.logprobs import Prompt
from trainer.refcache import file_sha256

T = TypeVar("T")


def adapter_identity(base: str, adapter_dir: Path | None) -> str:
    """``base`` for the reference; ``base`` plus the sha256 of the adapter's weights otherwise.

    Weights, not the directory's name: a registered version is a byte copy of the candidate's
    output, so the incumbent of one refresh is recognised as the candidate of the previous one.
    """
    if adapter_dir is None:
        return base
    weights = [file_sha256(path) for path in sorted(Path(adapter_dir).glob("*.safetensors"))]
    return f"{base}+adapter:{'+'.join(weights)}"


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def write_json(path: Path, value: Any) -> None:
    """Atomically, under a per-process temporary name: two ranks may write the same cache file,
    and either copy is the same."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def greedy_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    adapter: str | None,
    identity: str,
    max_new_tokens: int,
    batch_size: int,
    cache_dir: Path | None,
) -> list[str]:
    """``adapter``'s greedy replies to ``prompts`` (None: the reference). Each is generated
    once per (model ``identity``, length cap, prompt); ``identity`` must name the weights that
    ``adapter`` holds (:func:`adapter_identity`), or a stale reply would be read."""
    prefix = "reference-replies" if adapter is None else "replies"
    name = f"{prefix}-{_key(identity, max_new_tokens)}.json"
    path = cache_dir / name if cache_dir is not None else None
    known: dict[str, str] = json.loads(path.read_text()) if path and path.is_file() else {}
    keys = [hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest() for p in prompts]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in known}.values())
    if missing:
        fresh = generate(
            model,
            tokenizer,
            [prompts[i] for i in missing],
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        known |= {keys[i]: reply for i, reply in zip(missing, fresh, strict=True)}
        if path is not None:
            write_json(path, known)
    return [known[k] for k in keys]


def remembered(
    cache_dir: Path | None,
    what: str,
    key: Any,
    compute: Callable[[], T],
    *,
    dump: Callable[[T], Any] = lambda value: value,
    load: Callable[[Any], T] = lambda value: value,
) -> T:
    """``compute()``, kept in ``cache_dir`` as ``<what>-<hash of key>.json``; ``key`` must hold
    everything the value depends on (the model's identity, the inputs)."""
    path = cache_dir / f"{what}-{_key(key)}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        return load(json.loads(path.read_text()))
    value = compute()
    if path is not None:
        write_json(path, dump(value))
    return value
