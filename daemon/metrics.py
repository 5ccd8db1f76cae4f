"""Every Prometheus metric alignd exports, declared once against an injected registry.

Names carry the ``alignd_`` prefix and base units; labels are small fixed sets (event type,
DLQ reason code, outcome, check name, partition) — never a user, prompt or path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from daemon.states import FINISHED, ActivationTrigger
from feedback.consumer import BLOCKED_REASONS, BatchReport
from feedback.events import REASONS
from trainer.results import AdapterEval

CANARY_SIGNALS = ("edit_rate", "thumbs_down_rate", "unsupported_rate", "policy_violation_rate")


class Metrics:
    # Every metric in one place, one declaration each (docs/reference.md's table is generated from
    # them): long by design, with no logic to split out.
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # feedback flow
        self.events_consumed = Counter(
            "alignd_events_consumed_total", "Messages read from the feedback topic", registry=r
        )
        self.events_stored = Counter(
            "alignd_events_stored_total", "Valid events durably stored", ["type"], registry=r
        )
        self.events_duplicate = Counter(
            "alignd_events_duplicate_total", "Redelivered events already stored", registry=r
        )
        self.events_conflict = Counter(
            "alignd_events_conflict_total",
            "Events reusing a stored event_id with different content",
            registry=r,
        )
        self.events_dead_lettered = Counter(
            "alignd_events_dead_lettered_total",
            "Invalid messages sent to the DLQ",
            ["reason"],
            registry=r,
        )
        self.unverified_actors = Counter(
            "alignd_unverified_actor_events_total",
            "Events of a kind that must be signed (attribution.signed_kinds) whose actor could "
            "not be verified; they count as the one unattributed actor",
            ["kind", "reason"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "alignd_consumer_lag_records",
            "Records behind the high-water mark",
            ["partition"],
            registry=r,
        )
        self.consumer_ready = Gauge(
            "alignd_consumer_ready", "1 when the consumer reaches the broker and store", registry=r
        )
        self.consumer_blocked = Gauge(
            "alignd_consumer_blocked",
            "1 while a fetch error retrying cannot fix stops ingestion (unsupported codec, "
            "corrupt batch)",
            ["reason"],
            registry=r,
        )
        # snapshots and refreshes
        self.snapshot_examples = Gauge(
            "alignd_snapshot_examples",
            "Rows in the current snapshot",
            ["kind", "split"],
            registry=r,
        )
        self.refresh_runs = Counter(
            "alignd_refresh_runs_total", "Refresh runs by outcome", ["outcome"], registry=r
        )
        self.refresh_duration = Histogram(
            "alignd_refresh_duration_seconds",
            "Wall time of a refresh run",
            registry=r,
            buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800),
        )
        self.last_success = Gauge(
            "alignd_last_successful_refresh_timestamp_seconds",
            "When the last refresh finished without error",
            registry=r,
        )
        self.refresh_running = Gauge(
            "alignd_refresh_running", "1 while a refresh is running", registry=r
        )
        self.training_loss = Gauge(
            "alignd_last_training_loss", "Final-step loss of the last training run", registry=r
        )
        self.training_accuracy = Gauge(
            "alignd_last_training_reward_accuracy", "Final-step reward accuracy", registry=r
        )
        self.training_margin = Gauge(
            "alignd_last_training_reward_margin", "Final-step reward margin", registry=r
        )
        # evaluation and gate
        self.heldout_accuracy = Gauge(
            "alignd_heldout_preference_accuracy",
            "Held-out preference accuracy",
            ["adapter"],
            registry=r,
        )  # adapter: candidate | active
        self.factuality = Gauge(
            "alignd_factuality_score", "Multiple-choice factuality", ["adapter"], registry=r
        )
        self.kl = Gauge(
            "alignd_kl_to_reference_nats",
            "Requested change: per-token KL(adapter ‖ reference) on held-out chosen replies",
            ["adapter"],
            registry=r,
        )
        self.retain_drift = Gauge(
            "alignd_retain_drift_nats",
            "Drift at evaluation: KL(reference ‖ adapter) per reply on the retain set",
            ["adapter"],
            registry=r,
        )
        self.gate_decisions = Counter(
            "alignd_gate_decisions_total", "Gate decisions", ["outcome"], registry=r
        )
        self.gate_failed_checks = Counter(
            "alignd_gate_failed_checks_total", "Failed gate checks", ["check"], registry=r
        )
        self.promotions = Counter(
            "alignd_promotions_total", "Adapter activations", ["trigger"], registry=r
        )
        self.rollbacks = Counter("alignd_rollbacks_total", "Rollbacks", ["trigger"], registry=r)
        self.auth_failures = Counter(
            "alignd_auth_failures_total",
            "Wrong tokens presented (API bearer or console sign-in), by surface",
            ["surface"],
            registry=r,
        )
        for surface in ("api", "console"):
            self.auth_failures.labels(surface=surface)
        self.active_info = Info("alignd_active_adapter", "The active adapter version", registry=r)
        self.serving_pending = Gauge(
            "alignd_serving_pending",
            "1 while the last activation's serving hooks have not all succeeded (replayed each "
            "tick until serving agrees with the registry)",
            registry=r,
        )
        self.drift_kl = Gauge(
            "alignd_drift_retain_nats",
            "Drift probe: the active adapter's KL(reference ‖ adapter) per reply on the retain set",
            registry=r,
        )
        self.drift_probe_failures = Counter(
            "alignd_drift_probe_failures_total",
            "Drift probes that did not finish: failed, timed_out, stopped (drain)",
            ["reason"],
            registry=r,
        )
        for reason in ("failed", "timed_out", "stopped"):
            self.drift_probe_failures.labels(reason=reason)
        self.drift_probe_timestamp = Gauge(
            "alignd_drift_probe_timestamp_seconds",
            "When the drift probe last succeeded",
            registry=r,
        )
        # production feedback and the regression watch; adapter: the active and the previous
        # version only (role says which), older label values are removed
        self.production_rate = Gauge(
            "alignd_production_feedback_rate",
            "Per served adapter over watch.window_hours: edit_rate (share of handled replies "
            "agents changed), thumbs_down_rate, edit_size (mean normalised edit distance)",
            ["adapter", "role", "signal"],
            registry=r,
        )
        self.production_events = Gauge(
            "alignd_production_feedback_events",
            "Events behind each rate: handled (agents' sends, changed or not), rated",
            ["adapter", "role", "kind"],
            registry=r,
        )
        self.watch_regressed = Gauge(
            "alignd_watch_regressed",
            "1 while the watch finds the active adapter worse than its predecessor",
            registry=r,
        )
        self.watch_p_value = Gauge(
            "alignd_watch_p_value",
            "Last judgement's one-sided p-value per signal (NaN: not tested)",
            ["signal"],
            registry=r,
        )
        self.watch_timestamp = Gauge(
            "alignd_watch_last_run_timestamp_seconds", "When the watch last judged", registry=r
        )
        self.canary_fraction = Gauge(
            "alignd_canary_fraction",
            "Share of conversations the canary answers (0: no canary)",
            registry=r,
        )
        self.canary_changes = Counter(
            "alignd_canary_changes_total",
            "Canary changes: start, widen, promote, abort; by who (gate, operator, canary)",
            ["action", "trigger"],
            registry=r,
        )
        self.canary_verdicts = Counter(
            "alignd_canary_verdicts_total",
            "Canary analysis verdicts: continue, widen, promote, abort",
            ["verdict"],
            registry=r,
        )
        self.canary_p_value = Gauge(
            "alignd_canary_p_value",
            "Last canary judgement's one-sided p-value per signal (NaN: not tested)",
            ["signal"],
            registry=r,
        )
        self.canary_rate = Gauge(
            "alignd_canary_production_rate",
            "Canary and stable over the same hours: edit_rate, edit_size, thumbs_down_rate, and "
            "the gate's detectors on the served drafts: unsupported_rate, policy_compliance",
            ["adapter", "role", "signal"],
            registry=r,
        )
        self.canary_events = Gauge(
            "alignd_canary_production_events",
            "Events counted in the canary analysis's windows: handled, rated, drafts",
            ["adapter", "role", "kind"],
            registry=r,
        )
        self._precreate()

    def _precreate(self) -> None:
        """Label values exist from the first scrape, so rate() works at once."""
        for reason in sorted(REASONS):
            self.events_dead_lettered.labels(reason=reason)
        for blocked in BLOCKED_REASONS:
            self.consumer_blocked.labels(reason=blocked).set(0)
        for event_type in ("rating", "edit", "comparison"):
            self.events_stored.labels(type=event_type)
        for outcome in FINISHED:
            self.refresh_runs.labels(outcome=outcome)
        for trigger in (ActivationTrigger.GATE, ActivationTrigger.OPERATOR):
            self.promotions.labels(trigger=trigger)
        for trigger in (ActivationTrigger.OPERATOR, ActivationTrigger.WATCH):
            self.rollbacks.labels(trigger=trigger)
        for signal in ("edit_rate", "thumbs_down_rate"):
            self.watch_p_value.labels(signal=signal).set(float("nan"))
        for decision in ("promote", "reject"):
            self.gate_decisions.labels(outcome=decision)
        for verdict in ("continue", "widen", "promote", "abort"):
            self.canary_verdicts.labels(verdict=verdict)
        for signal in CANARY_SIGNALS:
            self.canary_p_value.labels(signal=signal).set(float("nan"))

    def record_eval(self, adapter: str, evaluation: AdapterEval) -> None:
        """The eval gauges of ``adapter`` (candidate | active); unmeasured values are left."""
        preference, drift = evaluation.preference, evaluation.retain_kl
        for gauge, value in (
            (self.heldout_accuracy, preference.reward_accuracy if preference else None),
            (self.factuality, evaluation.factuality),
            (self.kl, evaluation.kl_to_reference),
            (self.retain_drift, drift.nats_per_reply if drift else None),
        ):
            if value is not None:
                gauge.labels(adapter=adapter).set(value)

    def record_batch(self, report: BatchReport) -> None:
        self.events_consumed.inc(report.consumed)
        for event_type, n in report.stored_by_type.items():
            self.events_stored.labels(type=event_type).inc(n)
        self.events_duplicate.inc(report.duplicates)
        self.events_conflict.inc(report.conflicts)
        for reason, n in report.dead_lettered.items():
            self.events_dead_lettered.labels(reason=reason).inc(n)
        for (kind, why), n in report.unverified.items():
            self.unverified_actors.labels(kind=kind, reason=why).inc(n)
