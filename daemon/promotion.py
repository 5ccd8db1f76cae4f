"""Every change of the active adapter and the canary, whoever asks: the gate, an operator, the
regression watch, the canary analysis.

One path for all of them: the registry's change (locked, audited, refused when stale), the
counter labelled with the trigger, then the active adapter's and the canary's gauges
republished. A rollback
the watch starts also rejects the adapter it rolled back from, in the same call, so no trigger
has steps of its own that another one forgets.
"""

from __future__ import annotations

from daemon.metrics import Metrics
from daemon.registry import Registry, RegistryConflict, RegistryError
from daemon.states import ActivationTrigger


class Promotions:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry, self.metrics = registry, metrics

    def publish_active(self) -> None:
        """The active adapter's name, method and evaluation, and the canary's share, as gauges."""
        canary = self.registry.canary()
        self.metrics.canary_fraction.set(float(canary["fraction"]) if canary else 0.0)
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

    def start_canary(
        self,
        version: str,
        fraction: float,
        *,
        trigger: ActivationTrigger,
        actor: str,
        reason: str,
        force: bool = False,
        supersede: bool = False,
        expect_revision: str | None = None,
    ) -> None:
        self.registry.start_canary(
            version, fraction, actor=actor, reason=reason, force=force, supersede=supersede,
            expect_revision=expect_revision,
        )  # fmt: skip
        self.metrics.canary_changes.labels(action="start", trigger=trigger).inc()
        self.publish_active()

    def widen_canary(
        self,
        fraction: float,
        *,
        trigger: ActivationTrigger,
        actor: str,
        reason: str,
        expect_version: str | None = None,
        expect_revision: str | None = None,
    ) -> None:
        self.registry.widen_canary(
            fraction, actor=actor, reason=reason, expect_version=expect_version,
            expect_revision=expect_revision,
        )  # fmt: skip
        self.metrics.canary_changes.labels(action="widen", trigger=trigger).inc()
        self.publish_active()

    def promote_canary(
        self,
        *,
        trigger: ActivationTrigger,
        actor: str,
        reason: str,
        expect_version: str | None = None,
        force: bool = False,
        expect_revision: str | None = None,
    ) -> tuple[str, list[str]]:
        """The canary becomes the stable adapter for all traffic (needs every gate check unless
        ``force``). Returns it and the serving hooks' failures."""
        version = self.registry.canary_version()
        if version is None or (expect_version is not None and version != expect_version):
            raise RegistryConflict(f"the canary is {version or 'none'}, not {expect_version}")
        failures = self.activate(version, trigger=trigger, actor=actor, reason=reason,
                                 force=force, expect_revision=expect_revision)  # fmt: skip
        self.metrics.canary_changes.labels(action="promote", trigger=trigger).inc()
        return version, failures

    def abort_canary(
        self,
        *,
        trigger: ActivationTrigger,
        actor: str,
        reason: str,
        reject: bool = False,
        expect_version: str | None = None,
        expect_revision: str | None = None,
    ) -> str:
        version = self.registry.abort_canary(
            actor=actor, reason=reason, reject=reject, expect_version=expect_version,
            expect_revision=expect_revision,
        )  # fmt: skip
        self.metrics.canary_changes.labels(action="abort", trigger=trigger).inc()
        self.publish_active()
        return version
