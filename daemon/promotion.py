"""Every change of the active adapter, whoever asks: the gate, an operator, the regression watch.

One path for all of them: the registry's change (locked, audited, refused when stale), the
counter labelled with the trigger, then the active adapter's gauges republished. A rollback
the watch starts also rejects the adapter it rolled back from, in the same call, so no trigger
has steps of its own that another one forgets.
"""

from __future__ import annotations

from daemon.metrics import Metrics
from daemon.registry import Registry, RegistryError
from daemon.states import ActivationTrigger


class Promotions:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry, self.metrics = registry, metrics

    def publish_active(self) -> None:
        """The active adapter's name, method and evaluation as gauges."""
        active = self.registry.active()
        if active is None:
            self.metrics.active_info.info({"version": "none"})
            return
        try:
            manifest = self.registry.manifest(active)
        except RegistryError:
            return
        self.metrics.active_info.info({"version": active, "method": manifest.method or ""})
        self.metrics.record_eval("active", manifest.eval.candidate)

    def activate(
        self,
        version: str,
        *,
        trigger: ActivationTrigger,
        actor: str,
        reason: str,
        force: bool = False,
        expect_revision: str | None = None,
    ) -> list[str]:
        """Make ``version`` active; returns the serving hooks' failures (replayed later)."""
        failures = self.registry.promote(
            version, actor=actor, reason=reason, force=force, expect_revision=expect_revision
        )
        self.metrics.promotions.labels(trigger=trigger).inc()
        self.publish_active()
        return failures

    def rollback(
        self,
        *,
        trigger: ActivationTrigger,
        actor: str,
        reason: str,
        to: str | None = None,
        force: bool = False,
        expect_revision: str | None = None,
        expect_active: str | None = None,
        reject_current: bool = False,
    ) -> tuple[str, list[str]]:
        """Back to ``to`` (default: the previous active version). ``expect_active`` refuses the
        rollback when another change came first; with ``reject_current`` that version, the one
        rolled back from, is rejected too (never promoted again without a force)."""
        if reject_current and expect_active is None:
            raise ValueError("reject_current needs expect_active: which version to reject")
        version, failures = self.registry.rollback(
            actor=actor,
            reason=reason,
            to=to,
            force=force,
            expect_revision=expect_revision,
            expect_active=expect_active,
        )
        if reject_current and expect_active is not None:
            self.registry.reject(expect_active, actor=actor, reason=reason)
        self.metrics.rollbacks.labels(trigger=trigger).inc()
        self.publish_active()
        return version, failures
