"""The one strict, frozen pydantic base of every alignd config section and contract model, and
the file hash every package uses.

Unknown keys are errors (a typo fails at start-up, or when a file written by another process
is read, instead of silently using a default), and a loaded value never changes. ``feedback``
is the package every other one may import, so the base lives here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (adapters, GGUF bases: any size)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FrozenModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
