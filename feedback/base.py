"""The one strict, frozen pydantic base of every alignd config section and contract model, and
the helpers every package uses: a file hash, and schema creation that other processes race.

Unknown keys are errors (a typo fails at start-up, or when a file written by another process
is read, instead of silently using a default), and a loaded value never changes. ``feedback``
is the package every other one may import, so the base lives here.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (adapters, GGUF bases: any size)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_RACE = re.compile(r"database is locked|already exists|duplicate key")


def until_settled(
    create: Callable[[], object], *errors: type[Exception], timeout_s: float = 30.0
) -> None:
    """Run ``create`` (a new database's WAL switch and schema) while other processes may do the
    same: the ranks of a run opening one reference cache, `alignd serve` and `alignd ingest`
    (or two pods) opening one new feedback store.

    SQLite answers one of two connections that both ask to switch a new file to WAL "database is
    locked" at once, without waiting for its busy timeout (waiting could deadlock), and two
    processes may both find a table missing and create it ("already exists"; PostgreSQL reports
    a duplicate type). The other process settles both; trying again sees its work. Any other
    error of ``errors``, or one still failing after ``timeout_s``, is raised.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            create()
            return
        except errors as e:
            if not _RACE.search(str(e)) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.1))  # apart, so one of them goes first


class FrozenModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def refuse_retired(data: Any, retired: dict[str, str]) -> Any:
    """The body of a ``mode="before"`` validator: a config that still names a retired key fails
    saying what replaced it (``retired``: key → the rest of the sentence), not just "extra"."""
    if isinstance(data, dict):
        for key, why in retired.items():
            if key in data:
                raise ValueError(f"{key} {why}")
    return data
