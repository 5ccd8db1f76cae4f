"""What a refresh leaves behind, typed: a run's ``status.json`` (:class:`RunStatus`) and an
adapter version's ``manifest.json`` (:class:`VersionManifest`), written and read through these.

The refresh writes a run's status as it goes and, when it registers a candidate, the version's
manifest (the data, the run, the evaluation without customer text, the gate's decision); the
registry adds the version's name, time and file hashes; the gate's state, the console, the API,
the CLI and the next refresh read it. A field of the wrong type fails naming the field
(:class:`ManifestError`); fields this version does not know (from an older or a newer alignd)
are ignored, so every manifest on disk still loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from daemon.states import Outcome, RefreshTrigger
from feedback.manifest import ActorShares, EventRange, SnapshotCounts
from trainer.results import EvalReport

_Model = TypeVar("_Model", bound=BaseModel)


class ManifestError(ValueError):
    """A manifest.json or status.json that does not parse; the message names the field."""


def first_error(e: ValidationError) -> str:
    """``field.path: what is wrong`` of a validation error's first problem."""
    first = e.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(the file)"
    return f"{where}: {first['msg']}"


def _read(model: type[_Model], path: Path) -> _Model:
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as e:
        raise ManifestError(f"{path}: {first_error(e)}") from e


class _Record(BaseModel):
    # tolerant of fields it does not know (older and newer alignd), strict about the ones it does
    model_config = ConfigDict(extra="ignore", frozen=True)


class GateCheckRecord(_Record):
    name: str
    passed: bool
    value: float | None = None
    threshold: float | str | None = None
    detail: str = ""


class GateRecord(_Record):
    """The gate's decision as recorded (``daemon.gate.Decision``)."""

    promote: bool
    checks: list[GateCheckRecord] = []
    reasons: list[str] = []
    tier: Literal["stable", "canary", "none"] | None = Field(
        None, description="the widest exposure allowed; None in manifests before tiers"
    )
    tier_reason: str = ""

    @property
    def reached(self) -> str | None:
        """The tier reached; a manifest from before tiers that passed every check is stable."""
        return self.tier or ("stable" if self.promote else None)


class TrainingData(_Record):
    """What the run trained on: the whole snapshot, or new rows plus a replay sample."""

    mode: Literal["full", "incremental"]
    reason: str
    base_version: str | None = Field(None, description="incremental: the warm-start version")
    new: dict[str, int] = {}
    replayed: dict[str, int] = {}
    corrections: dict[str, int] = Field(
        {},
        description="agents' edits that changed a draft, in the snapshot's events, per adapter "
        "that served the draft (sft: none named); a canary's are its own mistakes next to the fix",
    )


class TrainingSummary(_Record):
    """The run's training in a few numbers (``result.json`` has every step)."""

    status: str
    steps: int = 0
    final_loss: float | None = None
    final_reward_accuracy: float | None = None
    final_reward_margin: float | None = None
    detectors: dict[str, bool] = {}
    timings: dict[str, float] = {}
    peak_memory_bytes: dict[str, int] = {}
    mined_pairs: int = Field(0, description="verifier-mined rows among those trained on")
    mining: dict[str, Any] = {}


class SnapshotSummary(_Record):
    """What the version records about its snapshot (``SnapshotManifest.summary``)."""

    counts: SnapshotCounts | None = None
    filtered: dict[str, int] = {}
    pair_sources: dict[str, int] = {}
    events: EventRange | None = None
    actors: ActorShares | None = None


class VersionManifest(_Record):
    version: str = Field("", description="set by the registry at registration")
    created_at: str = Field("", description="set by the registry (UTC, ISO 8601)")
    files: dict[str, str] = Field({}, description="sha256 per adapter file; empty before 0.2")
    run_id: str | None = None
    parent: str | None = Field(
        None, description="the version it was trained from: the canary if one ran, else the active"
    )
    method: str | None = None
    dataset_sha256: str | None = None
    snapshot: SnapshotSummary | None = None
    run_spec: dict[str, Any] = Field({}, description="the trainer's run spec, as it ran")
    training: TrainingSummary | None = None
    training_data: TrainingData | None = None
    eval: EvalReport = Field(EvalReport(), description="counts and hashes, no replies")
    gate: GateRecord | None = None

    @property
    def gate_passed(self) -> bool:
        return bool(self.gate and self.gate.promote)

    @classmethod
    def read(cls, path: Path) -> VersionManifest:
        return _read(cls, path)

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


class AdapterDetail(BaseModel):
    """``GET /v1/adapters/{version}``: a version, its state and its manifest."""

    version: str
    state: str = Field(description="active | candidate | retired | rejected")
    manifest: VersionManifest


class RunStatus(BaseModel):
    """A refresh run's ``status.json``: what started it, how it ended and why. Mutable: the
    refresh fills it in as the run goes and writes it at the start and at the end."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    trigger: RefreshTrigger
    outcome: Outcome
    reason: str
    started_at: str
    finished_at: str | None = None
    snapshot_sha256: str | None = None
    method: str | None = None
    version: str | None = None
    gate: GateRecord | None = None
    training: TrainingSummary | None = None
    trigger_detail: str = Field("", description='e.g. "240 new pairs (threshold 200)"')
    full: bool = Field(False, description="an operator asked for a full retrain")
    training_data: TrainingData | None = None

    @field_validator("gate", "training", "training_data", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None  # statuses before 0.3 wrote {} for "not yet"

    def end(self, outcome: Outcome, reason: str) -> None:
        self.outcome, self.reason = outcome, reason

    @classmethod
    def read(cls, path: Path) -> RunStatus:
        return _read(cls, path)
