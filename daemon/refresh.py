"""One refresh: snapshot → choose method → train in a child process → gate → register.

The trainer always runs as ``python -m trainer.train run.json`` in a child process, so a
crash, an OOM kill or a runaway run cannot take the daemon down; its time and memory are
bounded by config. A run that fails or is interrupted leaves the registry exactly as it was.
Everything a run did is kept in ``<data_dir>/runs/<run_id>/`` (run.json, train.log,
result.json, status.json).

Past 400 lines on purpose: one refresh top to bottom (snapshot, method, train, gate, register,
promote), the order docs/ARCHITECTURE.md tells a newcomer to read; promotion, the runners and
the records are already their own modules.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from daemon.config import AligndConfig, TrainingConfig
from daemon.gate import decide_promotion
from daemon.k8s_runner import KubernetesJobRunner
from daemon.metrics import Metrics
from daemon.promotion import Promotions
from daemon.records import (
    GateRecord,
    ManifestError,
    RunStatus,
    SnapshotSummary,
    TrainingData,
    TrainingSummary,
    VersionManifest,
)
from daemon.registry import Registry, RegistryError, atomic_write_json
from daemon.runners import LocalRunner, RunEnd, RunExit, Runner
from daemon.scheduler import Due, MethodChoice, RefreshState, choose_method, refresh_due
from daemon.states import SUCCESSFUL, ActivationTrigger, Outcome, RefreshTrigger
from feedback.increment import incremental_view
from feedback.manifest import SnapshotManifest
from feedback.snapshot import build_snapshot
from feedback.store import FeedbackStore
from trainer.methods import PAIRED_METHODS
from trainer.plan import PlanInput, model_shape, plan, refusal
from trainer.results import RunResult
from trainer.spec import RunSpec, SpecError

log = logging.getLogger("alignd.refresh")


@dataclass
class DaemonState:
    """What the scheduler needs to remember across restarts (``state.json``)."""

    last_started_at: str | None = None
    last_success_at: str | None = None
    last_trained_sha: str | None = None
    last_snapshot_seq: int = 0
    last_cron_check: str | None = None
    last_run_id: str | None = None

    @classmethod
    def load(cls, path: Path) -> DaemonState:
        if not path.exists():
            return cls()
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))


def _parse(ts: str | None) -> datetime | None:
    return datetime.fromisoformat(ts) if ts else None


class Refresher:
    def __init__(
        self,
        config: AligndConfig,
        store: FeedbackStore,
        registry: Registry,
        metrics: Metrics,
        promotions: Promotions,
    ) -> None:
        self.config, self.store, self.registry, self.metrics = config, store, registry, metrics
        self.promotions = promotions
        self.data_dir = config.paths.data_dir
        self.runs_dir = self.data_dir / "runs"
        self.snapshots_dir = self.data_dir / "snapshots"
        self.state_path = self.data_dir / "state.json"
        for d in (self.runs_dir, self.snapshots_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.state = DaemonState.load(self.state_path)
        if self.state.last_success_at:  # the gauge survives a restart
            metrics.last_success.set(datetime.fromisoformat(self.state.last_success_at).timestamp())
        self._recover()
        self.running = threading.Event()
        self.runner: Runner = make_runner(config.training)

    def _recover(self) -> None:
        """After a crash: runs left 'running' were interrupted; half-built snapshots go."""
        for leftover in self.snapshots_dir.glob(".building-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for status_path in self.runs_dir.glob("*/status.json"):
            try:
                status = RunStatus.read(status_path)
            except ManifestError as e:
                log.warning("not recovered: %s", e)
                continue
            if status.outcome == Outcome.RUNNING:
                status.end(Outcome.INTERRUPTED, "alignd stopped during this run")
                status.finished_at = datetime.now(UTC).isoformat()
                self._write_status(status)
                log.warning("run %s was interrupted by a crash", status.run_id)

    def due(self, now: datetime, *, running: bool, manual: bool) -> tuple[Due, dict[str, int]]:
        """Is a refresh due now (the pure rule, ``daemon.scheduler.refresh_due``, over this
        refresher's schedule state), with the new events per type it counted since the last
        snapshot. Records that cron was evaluated now (missed fires coalesce into one)."""
        state = self.state
        counts = self.store.counts_by_type(since_seq=state.last_snapshot_seq)
        decision = refresh_due(
            RefreshState(
                running=running,
                last_started_at=_parse(state.last_started_at),
                last_cron_check=_parse(state.last_cron_check) or now,
                new_pairs=counts.get("edit", 0) + counts.get("comparison", 0),
                new_ratings=counts.get("rating", 0),
                manual_requested=manual,
            ),
            now,
            self.config.schedule,
        )
        state.last_cron_check = now.isoformat()
        return decision, counts

    def run_status(self, run_id: str) -> RunStatus | None:
        """The run's status; None for an unknown run, or one whose status.json does not parse
        (logged, naming the field)."""
        if not all(c.isalnum() or c in "-_" for c in run_id):
            return None
        path = self.runs_dir / run_id / "status.json"
        if not path.is_file():
            return None
        try:
            return RunStatus.read(path)
        except ManifestError as e:
            log.warning("run %s: %s", run_id, e)
            return None

    def _write_status(self, outcome: RunStatus) -> None:
        run_dir = self.runs_dir / outcome.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "status.json", outcome.model_dump(mode="json"))

    # --- the pipeline -------------------------------------------------------------------------
    def refresh(
        self, trigger: RefreshTrigger, stop: threading.Event, detail: str = "", full: bool = False
    ) -> RunStatus:
        now = datetime.now(UTC)
        run_id = f"r{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        started = now.isoformat()
        outcome = RunStatus(
            run_id=run_id,
            trigger=trigger,
            outcome=Outcome.FAILED,
            reason="",
            started_at=started,
            trigger_detail=detail,
            full=full,
        )
        self.running.set()
        self.metrics.refresh_running.set(1)
        self.state.last_started_at, self.state.last_run_id = started, run_id
        self.state.save(self.state_path)
        self._write_status(outcome.model_copy(update={"outcome": Outcome.RUNNING}))
        t0 = time.monotonic()
        try:
            self._refresh(outcome, stop)
        except Exception as e:  # the daemon survives any refresh failure, and says what it was
            log.exception("refresh %s failed", run_id)
            outcome.end(Outcome.FAILED, f"{type(e).__name__}: {e}")
        finally:
            outcome.finished_at = datetime.now(UTC).isoformat()
            self._write_status(outcome)
            self.metrics.refresh_runs.labels(outcome=outcome.outcome).inc()
            self.metrics.refresh_duration.observe(time.monotonic() - t0)
            if outcome.outcome in SUCCESSFUL:
                self.state.last_success_at = outcome.finished_at
                self.metrics.last_success.set(time.time())
            self.state.save(self.state_path)
            self.metrics.refresh_running.set(0)
            self.running.clear()
            log.info("refresh %s: %s (%s)", run_id, outcome.outcome, outcome.reason)
        return outcome

    def expire_snapshots(self, cutoff: datetime) -> int:
        """Retention: a snapshot built before ``cutoff`` holds only events older than it."""
        removed = 0
        for manifest_path in self.snapshots_dir.glob("*/manifest.json"):
            try:
                built = datetime.fromisoformat(SnapshotManifest.load(manifest_path.parent).built_at)
            except (ValidationError, ValueError, OSError):
                continue  # not ours to judge: left for an operator
            if built < cutoff:
                shutil.rmtree(manifest_path.parent, ignore_errors=True)
                removed += 1
        return removed

    def expire_runs(self, cutoff: datetime) -> int:
        """Retention: run directories (spec, logs, result.json with held-out replies) of runs
        that finished before ``cutoff``. A running run is never touched."""
        removed = 0
        for status_path in self.runs_dir.glob("*/status.json"):
            try:
                status = json.loads(status_path.read_text())
                finished = datetime.fromisoformat(status["finished_at"])
            except (ValueError, KeyError, TypeError, OSError):
                continue  # running, or not ours to judge
            if status.get("outcome") != Outcome.RUNNING and finished < cutoff:
                shutil.rmtree(status_path.parent, ignore_errors=True)
                removed += 1
        return removed

    def _snapshot(self, run_id: str) -> tuple[SnapshotManifest, Path]:
        """Build the snapshot; snapshots are stored by content hash, so equal ones are shared."""
        seq = self.store.max_seq()
        building = self.snapshots_dir / f".building-{run_id}"
        manifest = build_snapshot(self.store, building, self.config.dataset)
        snapshot = self.snapshots_dir / manifest.sha256[:16]
        if snapshot.exists():
            shutil.rmtree(building)
        else:
            os.replace(building, snapshot)
        for kind, splits in (("pairs", manifest.counts.pairs), ("kto", manifest.counts.kto)):
            for split, n in (("train", splits.train), ("heldout", splits.heldout)):
                self.metrics.snapshot_examples.labels(kind=kind, split=split).set(n)
        self.state.last_snapshot_seq = seq
        return manifest, snapshot

    def _refresh(self, outcome: RunStatus, stop: threading.Event) -> None:
        run_dir = self.runs_dir / outcome.run_id
        manifest, snapshot = self._snapshot(outcome.run_id)
        sha = outcome.snapshot_sha256 = manifest.sha256
        if sha == self.state.last_trained_sha and outcome.trigger != RefreshTrigger.OPERATOR:
            return outcome.end(Outcome.SKIPPED, "snapshot unchanged since the last trained one")
        choice = choose_method(manifest, self.config.training)
        outcome.method = choice.method
        if choice.method is None:
            return outcome.end(Outcome.SKIPPED, choice.reason)

        active = self.registry.active()
        active_dir = self.registry.version_dir(active) if active else None
        # warm start from the canary when one runs: the new feedback holds agents' corrections
        # of its own drafts (the incumbent the gate compares with stays the stable adapter)
        base = self.registry.canary_version() or active
        base_dir = self.registry.version_dir(base) if base else None
        data, outcome.training_data = self._training_data(
            snapshot, manifest, base, choice.method, run_dir, full=outcome.full
        )
        outcome.training_data = outcome.training_data.model_copy(
            update={"corrections": self._corrections(manifest)}
        )
        log.info("refresh %s trains on %s", outcome.run_id, outcome.training_data.reason)
        incremental = outcome.training_data.mode == "incremental"
        spec = self._run_spec(
            data, run_dir / "train", choice, sha, active_dir, incremental, warm_from=base_dir
        )
        spec_path = run_dir / "run.json"
        spec_path.write_text(spec.model_dump_json(indent=1))
        refused = job_plan_refusal(spec, self.config.training)
        if refused:  # before a Job asks for GPUs it cannot use
            return outcome.end(Outcome.FAILED, refused)
        end = self.runner.run(outcome.run_id, spec_path, stop, self.config.training.timeout_s)
        self.state.last_trained_sha = sha  # tried: the same data is not retried automatically
        result, unreadable = _read_result(run_dir / "train" / "result.json")
        if result is not None:
            outcome.training = _training_summary(result)
            self._record_training(outcome.training)
        failure = _run_failure(end, result, unreadable)
        if failure is not None:
            return outcome.end(*failure)
        assert result is not None and result.adapter_dir is not None

        rollout = self.config.rollout
        decision = decide_promotion(
            result.eval, result.detectors, self.config.gate, manifest.actors,
            reviewed=rollout.reviewed_canary(),
        )  # fmt: skip
        outcome.gate = GateRecord.model_validate(decision.as_dict())
        self.metrics.gate_decisions.labels(
            outcome="promote" if decision.promote else "reject"
        ).inc()
        for check in decision.failed:
            self.metrics.gate_failed_checks.labels(check=check.name).inc()
        self.metrics.record_eval("candidate", result.eval.candidate)
        version = self.registry.register(
            Path(result.adapter_dir),
            VersionManifest(
                dataset_sha256=sha,
                snapshot=SnapshotSummary.model_validate(manifest.summary()),
                run_id=outcome.run_id,
                run_spec=spec.model_dump(mode="json"),
                training=outcome.training,
                training_data=outcome.training_data,
                # counts and hashes only: the replies stay in the run directory (retention)
                eval=result.eval.without_text(),
                gate=outcome.gate,
                parent=base,
                method=choice.method,
            ),
        )
        outcome.version = version
        self._expose(outcome, version, decision.tier, decision.tier_reason)

    def _expose(self, outcome: RunStatus, version: str, tier: str, why: str) -> None:
        """As far as the gate's tier allows: all traffic, a canary (the gate's ``canary`` tier,
        or every tier with ``rollout.canary``), or none."""
        rollout, run = self.config.rollout, outcome.run_id
        if tier == "none":
            return outcome.end(
                Outcome.REJECTED, "; ".join(outcome.gate.reasons if outcome.gate else [why])
            )
        if self.config.gate.policy == "manual":
            return outcome.end(
                Outcome.HELD, f"{version} reached the {tier} tier; waiting for an operator"
            )
        if tier == "stable" and not rollout.canary:
            self.promotions.activate(version, trigger=ActivationTrigger.GATE, actor="alignd-gate",
                                     reason=f"gate passed (run {run})")  # fmt: skip
            running = self.registry.canary_version()
            if running is not None:
                self.promotions.abort_canary(trigger=ActivationTrigger.GATE, actor="alignd-gate",
                                             reason=f"superseded: {version} passed every check",
                                             expect_version=running)  # fmt: skip
            return outcome.end(Outcome.PROMOTED, f"{version} passed the gate and is active")
        fraction = rollout.steps[0]
        try:
            self.promotions.start_canary(
                version, fraction, trigger=ActivationTrigger.GATE, actor="alignd-gate",
                reason=f"gate tier {tier} (run {run}): {why}", supersede=True,
            )  # fmt: skip
        except RegistryError as e:
            return outcome.end(Outcome.FAILED, f"{version} reached the {tier} tier, but: {e}")
        outcome.end(
            Outcome.CANARY,
            f"{version} serves a canary on {fraction:.0%} of traffic ({tier} tier: {why})",
        )

    def _corrections(self, manifest: SnapshotManifest) -> dict[str, int]:
        """Agents' edits in the snapshot that changed a draft, per version that served it
        (``sft``: none named; vLLM's names read as the version): a canary's are its own
        mistakes next to the fix."""
        prefix, found = f"{self.registry.adapter_prefix}-", Counter[str]()
        for served, n in manifest.events.corrections.items():
            found[served.removeprefix(prefix) or "sft"] += n
        return dict(sorted(found.items()))

    def _training_data(
        self,
        snapshot: Path,
        manifest: SnapshotManifest,
        active: str | None,
        method: str,
        run_dir: Path,
        *,
        full: bool,
    ) -> tuple[Path, TrainingData]:
        """The rows to train on: the whole snapshot, or (warm-starting from the active adapter)
        the rows new since its snapshot plus a replay sample (:mod:`feedback.increment`)."""
        training = self.config.training

        def whole(reason: str) -> tuple[Path, TrainingData]:
            return snapshot, TrainingData(mode="full", reason=f"the whole snapshot: {reason}")

        if full:
            return whole("an operator asked for a full retrain")
        if not (training.incremental and training.warm_start):
            return whole("training.incremental or training.warm_start is off")
        if active is None:
            return whole("no active adapter to build on")
        info = self.registry.manifest(active)
        if info.method != method:
            return whole(f"the method changed ({info.method} -> {method})")
        sha = info.dataset_sha256 or ""
        previous = self.snapshots_dir / sha[:16]
        if not sha or not (previous / "manifest.json").is_file():
            return whole(f"{active}'s snapshot is no longer on disk")
        rules = SnapshotManifest.load(previous).config.model_dump(mode="json")
        if rules != manifest.config.model_dump(mode="json"):
            return whole(f"the dataset rules changed since {active}'s snapshot")
        stats = incremental_view(
            snapshot,
            previous,
            run_dir / "data",
            replay_rows=training.replay_rows,
            replay_ratio=training.replay_ratio,
            seed=manifest.sha256,
        )
        # the kinds the method trains on (a KTO run falls back to pairs when it has no thumbs)
        kinds = ("pairs",) if method in PAIRED_METHODS else ("kto", "pairs")
        if not any(stats.new.get(kind, 0) for kind in kinds):
            shutil.rmtree(run_dir / "data", ignore_errors=True)
            return whole(f"no training rows are new since {active}'s snapshot")
        return run_dir / "data", TrainingData(
            mode="incremental",
            reason=f"warm start from {active}; {stats.describe()}",
            base_version=active,
            new=stats.new,
            replayed=stats.replayed,
        )

    def _run_spec(
        self,
        snapshot: Path,
        out: Path,
        choice: MethodChoice,
        sha: str,
        active_dir: Path | None,
        incremental: bool,
        *,
        warm_from: Path | None = None,
    ) -> RunSpec:
        """``warm_from``: the adapter training starts from (a running canary), else the active."""
        init_dir = warm_from or active_dir
        training = self.config.training
        later = [{"hyper": choice.overrides}] if choice.overrides else []
        if incremental and training.incremental_epochs is not None:
            later.append({"hyper": {"epochs": training.incremental_epochs}})
        return training.spec(
            {
                "data": str(snapshot),
                "output_dir": str(out),
                "method": choice.method,
                "dataset_sha256": sha,
                "data_kind": "kto_union" if choice.data_kind == "kto_union" else "auto",
                "incumbent_adapter": str(active_dir) if active_dir else None,
                "reference_cache": str(self.data_dir / "cache" / "reference.sqlite"),
                "init_adapter": str(init_dir) if init_dir and training.warm_start else None,
                "eval": {"curated_pairs": _path(self.config.gate.curated_heldout)},
            },
            *later,
        )

    def _record_training(self, training: TrainingSummary) -> None:
        for gauge, value in (
            (self.metrics.training_loss, training.final_loss),
            (self.metrics.training_accuracy, training.final_reward_accuracy),
            (self.metrics.training_margin, training.final_reward_margin),
        ):
            if value is not None:
                gauge.set(value)


def _path(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _run_failure(
    end: RunEnd, result: RunResult | None, unreadable: str
) -> tuple[Outcome, str] | None:
    """How a training run that produced no usable adapter ended; None when it did."""
    if end.exit is RunExit.TIMED_OUT:
        return Outcome.FAILED, end.detail
    if end.exit is RunExit.INTERRUPTED or (result and result.status == "interrupted"):
        return Outcome.INTERRUPTED, "stopped during shutdown"
    if result is None:  # no result, or one that does not parse: a reason, never a KeyError
        why = unreadable if end.exit is RunExit.SUCCEEDED else f"{end.detail}; {unreadable}"
        return Outcome.FAILED, why
    if end.exit is not RunExit.SUCCEEDED or result.status != "succeeded":
        return Outcome.FAILED, result.error or end.detail
    if result.adapter_dir is None:
        return Outcome.FAILED, "the run succeeded but names no adapter"
    return None


def job_plan_refusal(spec: RunSpec, training: TrainingConfig) -> str:
    """Why a training Job would not fit its GPUs (``trainer.plan``), naming what to change; ""
    when it fits, when training runs locally or on CPU, or when the base's shape is unknown
    (logged: the Job then runs unchecked)."""
    k8s = training.kubernetes
    if training.runner != "kubernetes" or k8s.gpus == 0:
        return ""
    try:
        shape = model_shape(spec.base_model)
    except (ValueError, OSError) as e:
        log.warning("no memory plan for this refresh (%s); the Job runs unchecked", e)
        return ""
    setup = PlanInput(
        shape=shape,
        lora_r=spec.lora.r,
        targets=tuple(spec.lora.target_modules),
        batch=spec.hyper.batch_size,
        seq_len=spec.hyper.max_length,
        dtype="bf16" if spec.dtype == "auto" else spec.dtype,
        quantize=spec.lora.quantize,
        engine=spec.engine if k8s.gpus > 1 else "single",
        gpus=k8s.gpus,
        gpu_memory_gib=k8s.gpu_memory_gib,
        checkpointing=spec.hyper.activation_checkpointing > 0,
    )
    return refusal(plan(setup))


def make_runner(config: TrainingConfig) -> Runner:
    """Where training runs: a local child process, or a Kubernetes Job (``training.runner``)."""
    if config.runner == "kubernetes":
        return KubernetesJobRunner(config.kubernetes)
    return LocalRunner(config)


def _read_result(path: Path) -> tuple[RunResult | None, str]:
    """The run's ``result.json``, or None and why it cannot be used."""
    if not path.is_file():
        return None, "the trainer wrote no result.json"
    try:
        return RunResult.load(path), ""
    except SpecError as e:
        return None, str(e)


def _training_summary(result: RunResult) -> TrainingSummary:
    last = result.steps[-1] if result.steps else None
    return TrainingSummary(
        status=result.status,
        steps=len(result.steps),
        final_loss=last.loss if last else None,
        final_reward_accuracy=last.reward_accuracy if last else None,
        final_reward_margin=last.reward_margin if last else None,
        detectors={k: v["fired"] for k, v in result.detectors.items()},
        timings=result.timings,
        peak_memory_bytes=result.peak_memory_bytes,
        # verifier-mined pairs (trainer.mining): how many of the rows trained on were mined
        mined_pairs=result.mining.get("pairs", 0),
        mining=result.mining,
    )
