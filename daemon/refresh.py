"""One refresh: snapshot → choose method → train in a child process → gate → register.

The trainer always runs as ``python -m trainer.train run.json`` in a child process, so a
crash, an OOM kill or a runaway run cannot take the daemon down; its time and memory are
bounded by config. A run that fails or is interrupted leaves the registry exactly as it was.
Everything a run did is kept in ``<data_dir>/runs/<run_id>/`` (run.json, train.log,
result.json, status.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.config import AligndConfig
from daemon.gate import decide_promotion
from daemon.local_runner import LocalRunner
from daemon.metrics import Metrics
from daemon.registry import Registry, RegistryError, atomic_write_json
from daemon.scheduler import choose_method
from feedback.snapshot import build_snapshot
from feedback.store import FeedbackStore
from trainer.spec import RunSpec

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


@dataclass
class RefreshOutcome:
    run_id: str
    trigger: str
    outcome: str  # promoted | held | rejected | failed | interrupted | skipped
    reason: str
    started_at: str
    finished_at: str | None = None
    snapshot_sha256: str | None = None
    method: str | None = None
    version: str | None = None
    gate: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


class Refresher:
    def __init__(
        self, config: AligndConfig, store: FeedbackStore, registry: Registry, metrics: Metrics
    ) -> None:
        self.config, self.store, self.registry, self.metrics = config, store, registry, metrics
        self.data_dir = config.paths.data_dir
        self.runs_dir = self.data_dir / "runs"
        self.snapshots_dir = self.data_dir / "snapshots"
        self.state_path = self.data_dir / "state.json"
        for d in (self.runs_dir, self.snapshots_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.state = DaemonState.load(self.state_path)
        self._recover()
        self.running = threading.Event()
        self.local = LocalRunner(config.training)

    def _recover(self) -> None:
        """After a crash: runs left 'running' were interrupted; half-built snapshots go."""
        for leftover in self.snapshots_dir.glob(".building-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for status_path in self.runs_dir.glob("*/status.json"):
            status = json.loads(status_path.read_text())
            if status.get("outcome") == "running":
                status |= {"outcome": "interrupted", "reason": "alignd stopped during this run",
                           "finished_at": datetime.now(UTC).isoformat()}  # fmt: skip
                atomic_write_json(status_path, status)
                log.warning("run %s was interrupted by a crash", status.get("run_id"))

    def run_status(self, run_id: str) -> dict[str, Any] | None:
        if not all(c.isalnum() or c in "-_" for c in run_id):
            return None
        path = self.runs_dir / run_id / "status.json"
        if not path.is_file():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def _write_status(self, outcome: RefreshOutcome) -> None:
        run_dir = self.runs_dir / outcome.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "status.json", asdict(outcome))

    # --- the pipeline -------------------------------------------------------------------------
    def refresh(self, trigger: str, stop: threading.Event) -> RefreshOutcome:
        now = datetime.now(UTC)
        run_id = f"r{now:%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        outcome = RefreshOutcome(run_id, trigger, "failed", "", started_at=now.isoformat())
        self.running.set()
        self.metrics.refresh_running.set(1)
        self.state.last_started_at, self.state.last_run_id = now.isoformat(), run_id
        self.state.save(self.state_path)
        self._write_status(
            RefreshOutcome(run_id, trigger, "running", "", started_at=now.isoformat())
        )
        t0 = time.monotonic()
        try:
            self._refresh(outcome, stop)
        except Exception as e:  # the daemon survives any refresh failure, and says what it was
            log.exception("refresh %s failed", run_id)
            outcome.outcome, outcome.reason = "failed", f"{type(e).__name__}: {e}"
        finally:
            outcome.finished_at = datetime.now(UTC).isoformat()
            self._write_status(outcome)
            self.metrics.refresh_runs.labels(outcome=outcome.outcome).inc()
            self.metrics.refresh_duration.observe(time.monotonic() - t0)
            if outcome.outcome in {"promoted", "held", "rejected", "skipped"}:
                self.state.last_success_at = outcome.finished_at
                self.metrics.last_success.set(time.time())
            self.state.save(self.state_path)
            self.metrics.refresh_running.set(0)
            self.running.clear()
            log.info("refresh %s: %s (%s)", run_id, outcome.outcome, outcome.reason)
        return outcome

    def _snapshot(self, run_id: str) -> tuple[dict[str, Any], Path]:
        """Build the snapshot; snapshots are stored by content hash, so equal ones are shared."""
        seq = self.store.max_seq()
        building = self.snapshots_dir / f".building-{run_id}"
        manifest = build_snapshot(self.store, building, self.config.dataset)
        snapshot = self.snapshots_dir / manifest["sha256"][:16]
        if snapshot.exists():
            shutil.rmtree(building)
        else:
            os.replace(building, snapshot)
        for kind, splits in manifest["counts"].items():
            for split, n in splits.items():
                self.metrics.snapshot_examples.labels(kind=kind, split=split).set(n)
        self.state.last_snapshot_seq = seq
        return manifest, snapshot

    def _refresh(self, outcome: RefreshOutcome, stop: threading.Event) -> None:
        run_dir = self.runs_dir / outcome.run_id
        manifest, snapshot = self._snapshot(outcome.run_id)
        sha = outcome.snapshot_sha256 = manifest["sha256"]
        if sha == self.state.last_trained_sha and outcome.trigger != "operator request":
            outcome.outcome, outcome.reason = (
                "skipped",
                "snapshot unchanged since the last trained one",
            )
            return
        choice = choose_method(manifest, self.config.training)
        outcome.method = choice.method
        if choice.method is None:
            outcome.outcome, outcome.reason = "skipped", choice.reason
            return

        active = self.registry.active()
        active_dir = self.registry.version_dir(active) if active else None
        spec = self._run_spec(
            snapshot,
            run_dir / "train",
            choice.method,
            choice.data_kind,
            choice.overrides,
            sha,
            active_dir,
        )
        spec_path = run_dir / "run.json"
        spec_path.write_text(spec.model_dump_json(indent=1))
        if self.config.training.runner == "kubernetes":
            from daemon.k8s_runner import KubernetesJobRunner

            runner = KubernetesJobRunner(self.config.training.kubernetes)
            code = runner.run(outcome.run_id, spec_path, stop, self.config.training.timeout_s)
        else:
            code = self.local.run(spec_path, run_dir, stop)
        result_path = run_dir / "train" / "result.json"
        result: dict[str, Any] = (
            json.loads(result_path.read_text()) if result_path.is_file() else {}
        )
        self.state.last_trained_sha = sha  # tried: the same data is not retried automatically
        outcome.training = self._training_summary(result)
        for gauge, key in (
            (self.metrics.training_loss, "final_loss"),
            (self.metrics.training_accuracy, "final_reward_accuracy"),
            (self.metrics.training_margin, "final_reward_margin"),
        ):
            if isinstance(outcome.training.get(key), int | float):
                gauge.set(outcome.training[key])
        if isinstance(code, str) and code.startswith("timed out"):
            outcome.outcome, outcome.reason = "failed", code
            return
        if code == "interrupted" or result.get("status") == "interrupted":
            outcome.outcome, outcome.reason = "interrupted", "stopped during shutdown"
            return
        if code != 0 or result.get("status") != "succeeded":
            outcome.outcome = "failed"
            outcome.reason = str(result.get("error") or code)
            return

        evaluation = result.get("eval", {})
        incumbent = evaluation.get("incumbent")
        decision = decide_promotion(
            {
                "candidate": evaluation.get("candidate", {}),
                "reference": evaluation.get("reference", {}),
                "detectors": result.get("detectors", {}),
            },
            incumbent,
            self.config.gate,
        )
        outcome.gate = decision.as_dict()
        self.metrics.gate_decisions.labels(
            outcome="promote" if decision.promote else "reject"
        ).inc()
        for check in decision.failed:
            self.metrics.gate_failed_checks.labels(check=check.name).inc()
        self._record_eval(evaluation)
        version = self.registry.register(
            Path(result["adapter_dir"]),
            {
                "dataset_sha256": sha,
                "snapshot": {
                    k: manifest[k] for k in ("counts", "filtered", "pair_sources", "events")
                },
                "run_id": outcome.run_id,
                "run_spec": json.loads(spec_path.read_text()),
                "training": outcome.training,
                "eval": evaluation,
                "gate": decision.as_dict(),
                "parent": active,
                "method": choice.method,
            },
        )
        outcome.version = version
        if not decision.promote:
            outcome.outcome, outcome.reason = "rejected", "; ".join(decision.reasons)
        elif self.config.gate.policy == "manual":
            outcome.outcome, outcome.reason = (
                "held",
                f"{version} passed the gate; waiting for an operator",
            )
        else:
            self.activate(
                version,
                trigger="gate",
                actor="alignd-gate",
                reason=f"gate passed (run {outcome.run_id})",
            )
            outcome.outcome, outcome.reason = "promoted", f"{version} passed the gate and is active"

    def _run_spec(
        self,
        snapshot: Path,
        out: Path,
        method: str,
        data_kind: str,
        overrides: dict[str, Any],
        sha: str,
        active_dir: Path | None,
    ) -> RunSpec:
        raw = _deep_merge(
            {
                "data": str(snapshot),
                "output_dir": str(out),
                "base_model": self.config.training.base_model,
                "method": method,
                "dataset_sha256": sha,
                "data_kind": "kto_union" if data_kind == "kto_union" else "auto",
                "incumbent_adapter": str(active_dir) if active_dir else None,
                "reference_cache": str(self.data_dir / "cache" / "reference.sqlite"),
                "init_adapter": str(active_dir)
                if active_dir and self.config.training.warm_start
                else None,
            },
            self.config.training.run_spec,
        )
        if overrides:
            raw = _deep_merge(raw, {"hyper": overrides})
        return RunSpec.model_validate(raw)

    @staticmethod
    def _training_summary(result: dict[str, Any]) -> dict[str, Any]:
        steps = result.get("steps") or []
        last = steps[-1] if steps else {}
        return {
            "status": result.get("status"),
            "steps": len(steps),
            "final_loss": last.get("loss"),
            "final_reward_accuracy": last.get("rewards/accuracies"),
            "final_reward_margin": last.get("rewards/margins"),
            "detectors": {k: v.get("fired") for k, v in (result.get("detectors") or {}).items()},
            "timings": result.get("timings", {}),
            "peak_memory_bytes": result.get("peak_memory_bytes", {}),
        }

    def _record_eval(self, evaluation: dict[str, Any]) -> None:
        cand = evaluation.get("candidate", {})
        for gauge, value in (
            (self.metrics.heldout_accuracy, cand.get("preference", {}).get("reward_accuracy")),
            (self.metrics.factuality, cand.get("factuality")),
            (self.metrics.kl, cand.get("kl_to_reference")),
        ):
            if isinstance(value, int | float):
                gauge.labels(adapter="candidate").set(value)

    # --- operator actions -------------------------------------------------------------------------
    def activate(
        self, version: str, *, trigger: str, actor: str, reason: str, force: bool = False
    ) -> list[str]:
        failures = self.registry.promote(version, actor=actor, reason=reason, force=force)
        self.metrics.promotions.labels(trigger=trigger).inc()
        self.publish_active()
        return failures

    def rollback(self, *, actor: str, reason: str, to: str | None = None) -> tuple[str, list[str]]:
        version, failures = self.registry.rollback(actor=actor, reason=reason, to=to)
        self.metrics.rollbacks.labels(trigger="operator").inc()
        self.publish_active()
        return version, failures

    def publish_active(self) -> None:
        active = self.registry.active()
        if active is None:
            self.metrics.active_info.info({"version": "none"})
            return
        try:
            manifest = self.registry.manifest(active)
        except RegistryError:
            return
        self.metrics.active_info.info(
            {"version": active, "method": str(manifest.get("method", ""))}
        )
        cand = manifest.get("eval", {}).get("candidate", {})
        for gauge, value in (
            (self.metrics.heldout_accuracy, cand.get("preference", {}).get("reward_accuracy")),
            (self.metrics.factuality, cand.get("factuality")),
            (self.metrics.kl, cand.get("kl_to_reference")),
        ):
            if isinstance(value, int | float):
                gauge.labels(adapter="active").set(value)
