"""The snapshot manifest (``<snapshot>/manifest.json``): the contract between the dataset
builder and whoever trains on or reports about a snapshot (the daemon, the trainer, the demo).

Written by :func:`feedback.snapshot.build_snapshot`; read with :meth:`SnapshotManifest.load`.
A missing or malformed file fails with a :class:`pydantic.ValidationError` naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from feedback.base import FrozenModel
from feedback.config import DatasetConfig

MANIFEST_FORMAT = "alignd-snapshot/1"


class SplitCounts(FrozenModel):
    train: int = Field(ge=0)
    heldout: int = Field(ge=0)


class SnapshotCounts(FrozenModel):
    """Rows per kind and split."""

    pairs: SplitCounts
    kto: SplitCounts


class KtoBalance(FrozenModel):
    """Thumbs in the training split and the KTO class weights that balance them."""

    desirable: int = Field(ge=0)
    undesirable: int = Field(ge=0)
    desirable_weight: float = Field(gt=0)
    undesirable_weight: float = Field(gt=0)


class EventRange(FrozenModel):
    """The stored events the snapshot was built from."""

    count: int = Field(ge=0)
    first_seq: int | None
    last_seq: int | None
    first_occurred_at: str | None
    last_occurred_at: str | None
    corrections: dict[str, int] = Field(
        {},
        description="agents' edits that changed a draft, per served_adapter as the events name "
        "it ('': none named, the SFT model); empty in manifests before it was counted",
    )


class ActorShare(FrozenModel):
    """One actor's rows: ``actor`` is sha256("kind:id")[:12], or ``(unattributed)``."""

    actor: str
    kind: str = Field(description="user | agent | annotator | system; empty if unattributed")
    rows: int = Field(ge=0)
    heldout_rows: int = Field(ge=0)
    share: float = Field(ge=0, le=1)
    heldout_share: float = Field(ge=0, le=1)


class ActorShares(FrozenModel):
    """How much of the snapshot each actor supplied (pairs and KTO rows together)."""

    distinct: int = Field(ge=0, description="actors, the unattributed bucket counted as one")
    unattributed_rows: int = Field(ge=0, description="rows from events that name no actor")
    largest_share: float = Field(ge=0, le=1, description="of all rows")
    largest_heldout_share: float = Field(ge=0, le=1, description="of the held-out rows")
    top: list[ActorShare] = Field(description="the five largest suppliers")


class SnapshotManifest(FrozenModel):
    format: str = Field(MANIFEST_FORMAT, description="layout version")
    sha256: str = Field(description="hash of the rows only: same events and rules, same hash")
    counts: SnapshotCounts
    pair_sources: dict[str, int] = Field(description="pairs by source: edit, comparison, mined")
    filtered: dict[str, int] = Field(description="events dropped by each dataset rule")
    kto_balance: KtoBalance
    events: EventRange
    actors: ActorShares | None = Field(None, description="None in manifests before shares")
    split_salt: Literal["secret", "public-default"] = Field(
        "public-default", description="whether held-out membership is predictable offline"
    )
    config: DatasetConfig = Field(description="the dataset rules it was built with")
    built_at: str

    @classmethod
    def load(cls, snapshot_dir: Path) -> SnapshotManifest:
        return cls.model_validate_json((snapshot_dir / "manifest.json").read_text())

    def summary(self) -> dict[str, object]:
        """What an adapter version records about the data it was trained on."""
        return self.model_dump(
            mode="json", include={"counts", "filtered", "pair_sources", "events", "actors"}
        )
