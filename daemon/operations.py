"""What an operator reads and does, one interface for both of the daemon's operator surfaces:
the admin API (``daemon.api``) and the console (``daemon.console``). Neither reaches past it
into the registry, the refresher or the store.

:class:`Operations` is the protocol (the API's tests implement it in memory); :class:`Desk`
implements it over a running daemon's parts. Every answer is a typed model, so the API's
OpenAPI document describes it and the console's templates read named fields.

Past 400 lines on purpose: the whole operator surface (reads, activations, the canary) and its
answer models in one place, so what an operator can do is read in one file.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field

from daemon.drift import DriftPoint
from daemon.metrics import Metrics
from daemon.promotion import Promotions
from daemon.records import AdapterDetail, RunStatus
from daemon.refresh import Refresher
from daemon.registry import Registry, RegistryConflict, VersionInfo
from daemon.regression import RegressionWatch
from daemon.rollout import CanaryAnalysis
from daemon.states import ActivationTrigger
from feedback.consumer import BLOCKED_REASONS, FeedbackConsumer
from feedback.production import AdapterFeedback
from feedback.store import FeedbackStore
from trainer.results import RunResult
from trainer.spec import SpecError

CanaryAction = Literal["start", "widen", "promote", "abort"]


class AdapterSummary(BaseModel):
    """One row of ``GET /v1/adapters`` (``alignd adapters list``)."""

    version: str
    state: str = Field(description="active | canary | candidate | retired | rejected")
    created_at: str
    method: str | None
    parent: str | None = Field(description="the version it was trained from")
    run_id: str | None
    dataset_sha256: str | None
    heldout_accuracy: float | None
    kl_to_reference: float | None = Field(description="on held-out chosen replies: reported")
    drift: float | None = Field(description="KL per retain reply: the gate's drift budget")
    factuality: float | None
    gate_passed: bool | None
    gate_tier: str | None = Field(None, description="stable | canary | none; None before tiers")

    @classmethod
    def of(cls, info: VersionInfo) -> AdapterSummary:
        m = info.manifest
        candidate = m.eval.candidate
        return cls(
            version=info.version,
            state=info.state,
            created_at=info.created_at,
            method=m.method,
            parent=m.parent,
            run_id=m.run_id,
            dataset_sha256=m.dataset_sha256,
            heldout_accuracy=candidate.preference.reward_accuracy if candidate.preference else None,
            kl_to_reference=candidate.kl_to_reference,
            drift=candidate.retain_kl.nats_per_reply if candidate.retain_kl else None,
            factuality=candidate.factuality,
            gate_passed=m.gate.promote if m.gate else None,
            gate_tier=m.gate.tier if m.gate else None,
        )


class ConsumerStatus(BaseModel):
    ready: bool
    error: str | None = Field(description="the last error, by type; never event content")
    lag: dict[str, int] = Field(description="records behind, per partition")
    consumed: int
    stored: int
    dead_lettered: int


class StoreStatus(BaseModel):
    last_seq: int | None = Field(description="the newest stored event's sequence number")
    new_since_last_snapshot: dict[str, int] | None = Field(
        description="per event type, as of the last refresh tick (status never counts the store)"
    )
    error: str | None = Field(description="the store's last error, by type")


class CanaryStatus(BaseModel):
    """The running canary (``GET /v1/canary``, ``alignd canary show``)."""

    version: str
    fraction: float = Field(description="share of conversations it answers")
    started_at: str
    changed_at: str = Field(description="when its current step (start or last widening) began")
    stable: str | None = Field(description="the stable version when it started (None: SFT)")
    tier: str | None = Field(description="the gate's tier for it: canary | stable")
    last_verdict: dict[str, Any] | None = Field(description="the analysis's latest verdict")


class CanaryChanged(BaseModel):
    """A canary action's answer: the canary now (None: ended) and the routing document."""

    action: CanaryAction
    version: str
    canary: CanaryStatus | None
    routing: dict[str, Any]
    serving_hook_failures: list[str] = []


class ServiceStatus(BaseModel):
    """``GET /v1/status`` (``alignd status``): what is served, and what the daemon is doing."""

    active_adapter: str | None
    refresh_running: bool
    last_run_id: str | None
    last_success_at: str | None
    last_run: RunStatus | None
    consumer: ConsumerStatus
    store: StoreStatus
    watch: dict[str, Any] | None = Field(description="the regression watch's latest verdict")
    canary: CanaryStatus | None = Field(None, description="the running canary, if any")
    uptime_s: float
    pid: int


class AuditEntry(BaseModel):
    """One line of the registry's audit log; actions add their own fields (``previous``...)."""

    model_config = ConfigDict(extra="allow")

    at: str
    action: str
    actor: str
    reason: str = ""
    version: str | None = None


class Operations(Protocol):
    """The operator's reads and actions. Registry methods raise RegistryError kinds:
    :class:`~daemon.registry.VersionNotFound`, any other conflict, a changed registry
    (``expect_revision`` no longer current)."""

    def readiness_problems(self) -> list[str]: ...
    def metrics_exposition(self) -> bytes: ...
    def status(self) -> ServiceStatus: ...
    def adapters(self) -> list[AdapterSummary]: ...
    def adapter(self, version: str) -> AdapterDetail: ...
    def run(self, run_id: str) -> RunStatus | None: ...
    def runs(self, limit: int) -> list[RunStatus]: ...
    def run_result(self, run_id: str) -> RunResult | None: ...
    def production_feedback(self, version: str | None, since: datetime) -> AdapterFeedback: ...
    def drift_history(self, limit: int) -> list[DriftPoint]: ...
    def revision(self) -> str: ...
    def audit(self, *, version: str | None = None, limit: int = 500) -> list[AuditEntry]: ...
    def audit_since(self, revision: str) -> list[AuditEntry]: ...
    def promote(
        self,
        version: str,
        *,
        actor: str,
        reason: str,
        force: bool,
        expect_revision: str | None = None,
    ) -> list[str]: ...
    def rollback(
        self,
        *,
        actor: str,
        reason: str,
        to: str | None,
        force: bool = False,
        expect_revision: str | None = None,
    ) -> tuple[str, list[str]]: ...
    def reject(
        self, version: str, *, actor: str, reason: str, expect_revision: str | None = None
    ) -> None: ...
    def request_refresh(self, actor: str, *, full: bool = False) -> tuple[bool, str]: ...
    def canary(self) -> CanaryStatus | None: ...
    def routing(self) -> dict[str, Any]: ...
    def change_canary(
        self,
        action: CanaryAction,
        *,
        actor: str,
        reason: str,
        version: str | None = None,
        fraction: float | None = None,
        force: bool = False,
        expect_revision: str | None = None,
    ) -> CanaryChanged: ...


def load_result(path: Path) -> RunResult | None:
    try:
        return RunResult.load(path)
    except (SpecError, OSError):
        return None


@dataclass
class Desk:
    """:class:`Operations` over the daemon's parts (``daemon.service.Service`` builds it).
    ``request_refresh`` and ``new_counts`` come from the service's lifecycle: it owns the
    refresh worker and the tick."""

    data_dir: Path
    registry: Registry
    refresher: Refresher
    watcher: RegressionWatch
    analysis: CanaryAnalysis
    promotions: Promotions
    store: FeedbackStore
    consumer: FeedbackConsumer
    metrics: Metrics
    stopping: threading.Event
    request_refresh: Callable[..., tuple[bool, str]]
    new_counts: Callable[[], dict[str, int] | None]
    started_at: float

    # --- reads ---------------------------------------------------------------------------------
    def readiness_problems(self) -> list[str]:
        problems = []
        try:
            self.store.ping()
        except Exception as e:
            problems.append(f"store: {type(e).__name__}")
        if not self.consumer.ready:
            problems.append(f"consumer: {self.consumer.last_error or 'not connected yet'}")
        if self.stopping.is_set():
            problems.append("shutting down")
        return problems

    def metrics_exposition(self) -> bytes:
        """The Prometheus text exposition, gauges read at scrape time."""
        self.metrics.consumer_ready.set(1 if self.consumer.ready else 0)
        for reason in BLOCKED_REASONS:
            blocked = self.consumer.blocked == reason
            self.metrics.consumer_blocked.labels(reason=reason).set(1 if blocked else 0)
        for partition, lag in self.consumer.partition_lag.items():
            self.metrics.consumer_lag.labels(partition=str(partition)).set(lag)
        return generate_latest(self.metrics.registry)

    def status(self) -> ServiceStatus:
        state = self.refresher.state
        last = self.refresher.run_status(state.last_run_id) if state.last_run_id else None
        totals = self.consumer.totals
        return ServiceStatus(
            active_adapter=self.registry.active(),
            refresh_running=self.refresher.running.is_set(),
            last_run_id=state.last_run_id,
            last_success_at=state.last_success_at,
            last_run=last,
            consumer=ConsumerStatus(
                ready=self.consumer.ready,
                error=self.consumer.last_error,
                lag={str(p): lag for p, lag in self.consumer.partition_lag.items()},
                consumed=totals.consumed,
                stored=totals.stored,
                dead_lettered=sum(totals.dead_lettered.values()),
            ),
            store=self._store_status(),
            watch=self.watcher.last,
            canary=self.canary(),
            uptime_s=time.time() - self.started_at,
            pid=os.getpid(),
        )

    def _store_status(self) -> StoreStatus:
        """Cheap: the newest sequence number (an index lookup) and the counts the last refresh
        tick took; never a full count. Errors by type only."""
        try:
            last_seq: int | None = self.store.max_seq()
            error = None
        except Exception as e:
            last_seq, error = None, type(e).__name__
        return StoreStatus(last_seq=last_seq, new_since_last_snapshot=self.new_counts(),
                           error=error)  # fmt: skip

    def adapters(self) -> list[AdapterSummary]:
        return [AdapterSummary.of(info) for info in self.registry.list_versions()]

    def adapter(self, version: str) -> AdapterDetail:
        info = self.registry.show(version)
        return AdapterDetail(version=info.version, state=info.state, manifest=info.manifest)

    def run(self, run_id: str) -> RunStatus | None:
        return self.refresher.run_status(run_id)

    def runs(self, limit: int) -> list[RunStatus]:
        """The newest runs' statuses, newest first (run ids start with their start time)."""
        names = sorted((p.name for p in self.refresher.runs_dir.iterdir() if p.is_dir()),
                       reverse=True)[:limit]  # fmt: skip
        return [s for s in (self.refresher.run_status(n) for n in names) if s is not None]

    def run_result(self, run_id: str) -> RunResult | None:
        """A run's ``result.json`` (with the replies) while retention keeps its directory."""
        if not run_id or self.refresher.run_status(run_id) is None:
            return None
        return load_result(self.refresher.runs_dir / run_id / "train" / "result.json")

    def production_feedback(self, version: str | None, since: datetime) -> AdapterFeedback:
        return self.watcher.production_feedback(version, since)

    def drift_history(self, limit: int) -> list[DriftPoint]:
        path = self.data_dir / "drift.jsonl"
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()][-limit:]
        return [DriftPoint.model_validate(json.loads(line)) for line in lines]

    def revision(self) -> str:
        return self.registry.revision()

    def audit(self, *, version: str | None = None, limit: int = 500) -> list[AuditEntry]:
        """The newest ``limit`` entries, oldest first; of one version when ``version`` is set."""
        entries = [e for e in self.registry.audit() if version in (None, e.get("version"))]
        return [AuditEntry.model_validate(e) for e in entries[-limit:]]

    def audit_since(self, revision: str) -> list[AuditEntry]:
        return [AuditEntry.model_validate(e) for e in self.registry.audit(since=revision)]

    # --- actions -------------------------------------------------------------------------------
    def promote(
        self,
        version: str,
        *,
        actor: str,
        reason: str,
        force: bool,
        expect_revision: str | None = None,
    ) -> list[str]:
        return self.promotions.activate(
            version,
            trigger=ActivationTrigger.OPERATOR,
            actor=actor,
            reason=reason,
            force=force,
            expect_revision=expect_revision,
        )

    def rollback(
        self,
        *,
        actor: str,
        reason: str,
        to: str | None,
        force: bool = False,
        expect_revision: str | None = None,
    ) -> tuple[str, list[str]]:
        return self.promotions.rollback(
            trigger=ActivationTrigger.OPERATOR,
            actor=actor,
            reason=reason,
            to=to,
            force=force,
            expect_revision=expect_revision,
        )

    def reject(
        self, version: str, *, actor: str, reason: str, expect_revision: str | None = None
    ) -> None:
        self.registry.reject(version, actor=actor, reason=reason, expect_revision=expect_revision)

    # --- the canary ------------------------------------------------------------------------------
    def canary(self) -> CanaryStatus | None:
        record = self.registry.canary()
        if record is None:
            return None
        gate = self.registry.manifest(record["version"]).gate
        last = self.analysis.last
        return CanaryStatus(
            version=record["version"],
            fraction=record["fraction"],
            started_at=record["started_at"],
            changed_at=record["changed_at"],
            stable=record.get("stable"),
            tier=gate.reached if gate else None,
            last_verdict=last if last and last.get("canary") == record["version"] else None,
        )

    def routing(self) -> dict[str, Any]:
        return self.registry.routing()

    def change_canary(
        self,
        action: CanaryAction,
        *,
        actor: str,
        reason: str,
        version: str | None = None,
        fraction: float | None = None,
        force: bool = False,
        expect_revision: str | None = None,
    ) -> CanaryChanged:
        """An operator's canary action. ``start`` needs ``version`` (``fraction`` defaults to
        the first of ``rollout.steps``), ``widen`` a ``fraction`` (default: the next step);
        ``promote`` and ``abort`` act on the running canary (``version``, if given, must be it)."""
        promotions, rollout = self.promotions, self.analysis.config
        common: dict[str, Any] = {"trigger": ActivationTrigger.OPERATOR, "actor": actor,
                                  "reason": reason, "expect_revision": expect_revision}  # fmt: skip
        failures: list[str] = []
        if action == "start":
            if version is None:
                raise RegistryConflict("start needs the version to expose")
            promotions.start_canary(version, fraction or rollout.steps[0], force=force, **common)
        else:
            running = self.registry.canary()
            if running is None:
                raise RegistryConflict("no canary is running")
            version = version or str(running["version"])
            if action == "widen":
                wider = fraction or rollout.next_step(float(running["fraction"]))
                if wider is None:
                    raise RegistryConflict("at the last step already: promote, or give a fraction")
                promotions.widen_canary(wider, expect_version=version, **common)
            elif action == "promote":
                _, failures = promotions.promote_canary(expect_version=version, force=force,
                                                        **common)  # fmt: skip
            else:
                promotions.abort_canary(expect_version=version, **common)
        return CanaryChanged(action=action, version=version, canary=self.canary(),
                             routing=self.routing(), serving_hook_failures=failures)  # fmt: skip
