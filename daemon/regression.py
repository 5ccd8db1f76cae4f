"""The regression watch at work: gather the two windows of production feedback, ask the pure
decision (:func:`daemon.watch.judge`), export it, and act on a regression per ``watch.action``
through the one promotion path (:class:`daemon.promotion.Promotions`)."""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.metrics import Metrics
from daemon.promotion import Promotions
from daemon.registry import Registry, RegistryError
from daemon.routing import served_names
from daemon.states import ActivationTrigger
from daemon.watch import Verdict, WatchConfig, judge
from feedback.production import AdapterFeedback, summarize
from feedback.store import FeedbackStore

log = logging.getLogger("alignd.watch")


def _parse(ts: str | None) -> datetime | None:
    return datetime.fromisoformat(ts) if ts else None


class RegressionWatch:
    def __init__(
        self,
        config: WatchConfig,
        *,
        vllm_prefix: str,
        store: FeedbackStore,
        registry: Registry,
        metrics: Metrics,
        promotions: Promotions,
        stopping: threading.Event,
        max_actor_share: float | None = None,
    ) -> None:
        self.config, self.vllm_prefix = config, vllm_prefix
        self.max_actor_share = max_actor_share  # the gate's: one actor's evidence is not enough
        self.store, self.registry, self.metrics = store, registry, metrics
        self.promotions, self.stopping = promotions, stopping
        self.last: dict[str, Any] | None = None  # the latest verdict, for status

    def production_feedback(self, version: str | None, since: datetime) -> AdapterFeedback:
        """The version's window, counting only feedback it could have caused: events dated
        inside one of its service windows (``Registry.service_windows``), from
        ``watch.clock_skew_s`` before it started serving to ``watch.feedback_lag_hours`` after
        it stopped. An event that names the version at another time is not its evidence
        (``outside`` counts them)."""
        recent = self.store.recent_served(
            served_names(version, self.vllm_prefix), since=since, limit=self.config.max_events
        )
        skew = timedelta(seconds=self.config.clock_skew_s)
        lag = timedelta(hours=self.config.feedback_lag_hours)
        windows = [
            (start - skew if start else None, end + lag if end else None)
            for start, end in self.registry.service_windows(version)
        ]
        served = [e for e in recent if any(
            (start is None or start <= e.occurred_at) and (end is None or e.occurred_at <= end)
            for start, end in windows
        )]  # fmt: skip
        feedback = summarize(served, self.config.per_actor())
        return replace(feedback, outside=len(recent) - len(served))

    def check(self, now: datetime | None = None) -> Verdict | None:
        """Judge the active adapter's production feedback against its predecessor's; on a
        regression, roll back (and reject it) or only alert, per ``watch.action``."""
        config = self.config
        now = now or datetime.now(UTC)
        record = self.registry.activation()
        active = record.get("version")
        if not active or self.stopping.is_set():
            return None
        previous = record.get("previous")
        changed_at = _parse(record.get("changed_at")) or now
        window = timedelta(hours=config.window_hours)
        current = self.production_feedback(active, now - window)
        # the predecessor's last window of service, and feedback on its replies that came later
        before = self.production_feedback(previous, changed_at - window)
        self._publish({"active": (active, current), "previous": (previous, before)})
        if record.get("action", "promote") != "promote":
            verdict = Verdict("ok", f"{active} was restored by a rollback: nothing to compare")
        elif now - changed_at > timedelta(hours=config.watch_hours):
            verdict = Verdict("ok", f"{active} has been active over {config.watch_hours:g} h")
        else:
            verdict = judge(current, before, config, self.max_actor_share)
        self.metrics.watch_timestamp.set(now.timestamp())
        for name in ("edit_rate", "thumbs_down_rate"):
            tested = [t.p_value for t in verdict.tests if t.signal == name]
            self.metrics.watch_p_value.labels(signal=name).set(
                tested[0] if tested else float("nan")
            )
        self.metrics.watch_regressed.set(1 if verdict.regressed else 0)
        self.last = {
            "at": now.isoformat(),
            "active": active,
            "previous": previous,
            "status": verdict.status,
            "reason": verdict.reason,
        }
        if verdict.regressed:
            self._on_regression(active, previous, verdict)
        elif verdict.status == "refused":
            log.warning("regression watch: %s vs %s: %s", active, previous, verdict.reason)
        return verdict

    def _on_regression(self, active: str, previous: str | None, verdict: Verdict) -> None:
        summary = f"{active} vs {previous or 'the SFT model'}: {verdict.reason}"
        if self.config.action == "alert" or previous is None:
            why = "watch.action is alert" if previous else "no earlier version to roll back to"
            log.warning("regression watch: %s (%s; not rolling back)", summary, why)
            return
        try:
            to, failures = self.promotions.rollback(
                trigger=ActivationTrigger.WATCH,
                actor="alignd-watch",
                reason=f"auto-rollback: {verdict.reason}",
                expect_active=active,
                reject_current=True,
            )
        except RegistryError as e:
            log.error("regression watch: %s; the rollback was refused: %s", summary, e)
            return
        self.metrics.watch_regressed.set(0)
        log.warning(
            "regression watch rolled %s back to %s: %s%s",
            active,
            to,
            verdict.reason,
            f" (serving hooks failed: {'; '.join(failures)})" if failures else "",
        )

    def _publish(self, windows: dict[str, tuple[str | None, AdapterFeedback]]) -> None:
        """The two windows as gauges; label values of versions no longer watched are removed."""
        self.metrics.production_rate.clear()
        self.metrics.production_events.clear()
        for role, (version, feedback) in windows.items():
            adapter = version or "sft"
            for name in ("edit_rate", "thumbs_down_rate", "edit_size"):
                value = getattr(feedback, name)
                if value is not None:
                    self.metrics.production_rate.labels(adapter, role, name).set(value)
            self.metrics.production_events.labels(adapter, role, "handled").set(feedback.handled)
            self.metrics.production_events.labels(adapter, role, "rated").set(feedback.rated)
