"""The canary analysis at work: gather the canary's and the stable adapter's production feedback
over the same hours, run the gate's detectors on the drafts those events carry, ask the pure
decision (:func:`daemon.canary.analyse`), export it, audit it, and act per ``rollout.action``
through the one promotion path (:class:`daemon.promotion.Promotions`)."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.canary import CanaryVerdict, DraftChecks, RolloutConfig, Window, analyse
from daemon.metrics import CANARY_SIGNALS, Metrics
from daemon.promotion import Promotions
from daemon.registry import Registry, RegistryError
from daemon.routing import served_names
from daemon.states import ActivationTrigger
from feedback.events import EditEvent, RatingEvent
from feedback.production import actor_key, counted, summarize, top_share
from feedback.store import FeedbackStore
from trainer.spec import GroundingSpec, PolicyRule
from trainer.verifier import check_reply

log = logging.getLogger("alignd.canary")
ACTOR = "alignd-canary"


def draft_checks(
    events: Sequence[EditEvent | RatingEvent],
    grounding: GroundingSpec,
    rules: Sequence[PolicyRule],
) -> DraftChecks:
    """The gate's detectors on each event's served draft (``completion``), against the event's
    own conversation and tags."""
    unsupported = ruled = broken = 0
    actors: Counter[str] = Counter()
    for event in events:
        context = [m.content for m in event.prompt]
        found = check_reply(event.completion, context, dict(event.tags), grounding, rules)
        actors[actor_key(event)] += 1
        unsupported += bool(found.unsupported)
        ruled += found.ruled
        broken += bool(found.violations)
    return DraftChecks(len(events), unsupported, ruled, broken, len(actors), top_share(actors))


def without_loudest(
    kept: Sequence[EditEvent | RatingEvent],
    grounding: GroundingSpec,
    rules: Sequence[PolicyRule],
) -> Window:
    """A window of counted events judged without its loudest actor (the most counted events;
    ties: the first counted), so one account can neither make nor hide a regression."""
    loudest = Counter(actor_key(e) for e in kept).most_common(1)
    rest = [e for e in kept if not loudest or actor_key(e) != loudest[0][0]]
    return Window(summarize(rest), draft_checks(rest, grounding, rules), len(kept) - len(rest))


class CanaryAnalysis:
    def __init__(
        self,
        config: RolloutConfig,
        *,
        grounding: GroundingSpec,
        rules: Sequence[PolicyRule],
        store: FeedbackStore,
        registry: Registry,
        metrics: Metrics,
        promotions: Promotions,
        stopping: threading.Event,
        max_actor_share: float | None = None,
    ) -> None:
        self.config, self.grounding, self.rules = config, grounding, tuple(rules)
        self.store, self.registry, self.metrics = store, registry, metrics
        self.promotions, self.stopping = promotions, stopping
        self.max_actor_share = max_actor_share
        self.last: dict[str, Any] | None = None  # the latest verdict, for status and the console

    def window(self, version: str | None, since: datetime) -> Window:
        """One adapter's counted feedback and its drafts' checks since ``since``."""
        events = self.store.recent_served(
            served_names(version, self.registry.adapter_prefix),
            since=since,
            limit=self.config.max_events,
        )
        kept, _ = counted(events, self.config.per_actor())
        return without_loudest(kept, self.grounding, self.rules)

    def check(self, now: datetime | None = None) -> CanaryVerdict | None:
        """Judge the running canary against stable over the hours since its current step began;
        act on the verdict per ``rollout.action``."""
        now = now or datetime.now(UTC)
        record = self.registry.canary()
        if record is None or self.stopping.is_set():
            return None
        version, fraction = str(record["version"]), float(record["fraction"])
        stable = self.registry.active()
        since = datetime.fromisoformat(record["changed_at"])
        canary, control = self.window(version, since), self.window(stable, since)
        gate = self.registry.manifest(version).gate
        verdict = analyse(
            canary,
            control,
            self.config,
            fraction=fraction,
            step_hours=(now - since) / timedelta(hours=1),
            tier=gate.reached if gate else None,
            max_actor_share=self.max_actor_share,
        )
        self._publish(version, stable, verdict)
        self.last = {"at": now.isoformat(), "canary": version, "stable": stable,
                     "fraction": fraction, "verdict": verdict.action,
                     "reason": verdict.describe()}  # fmt: skip
        if verdict.action != "continue":
            self._act(version, verdict)
        return verdict

    def _act(self, version: str, verdict: CanaryVerdict) -> None:
        summary = verdict.describe()
        if self.config.action == "alert":
            log.warning("canary %s: %s (rollout.action is alert: not acting)", version, summary)
            return
        why, trigger = f"canary analysis: {summary}", ActivationTrigger.CANARY
        promotions = self.promotions
        try:
            if verdict.action == "abort":
                promotions.abort_canary(trigger=trigger, actor=ACTOR, reason=why, reject=True,
                                        expect_version=version)  # fmt: skip
            elif verdict.action == "widen" and verdict.to_fraction is not None:
                promotions.widen_canary(verdict.to_fraction, trigger=trigger, actor=ACTOR,
                                        reason=why, expect_version=version)  # fmt: skip
            elif verdict.action == "promote":
                promotions.promote_canary(trigger=trigger, actor=ACTOR, reason=why,
                                          expect_version=version)  # fmt: skip
        except RegistryError as e:
            log.error("canary %s: %s; the registry refused it: %s", version, summary, e)
            return
        log.warning("canary %s: %s", version, summary)

    def _publish(self, canary: str, stable: str | None, verdict: CanaryVerdict) -> None:
        metrics = self.metrics
        metrics.canary_verdicts.labels(verdict=verdict.action).inc()
        tested = {t.signal: t.p_value for t in verdict.tests}
        for signal in CANARY_SIGNALS:
            metrics.canary_p_value.labels(signal=signal).set(tested.get(signal, float("nan")))
        metrics.canary_rate.clear()
        metrics.canary_events.clear()
        for role, version, window in (("canary", canary, verdict.canary),
                                      ("stable", stable, verdict.stable)):  # fmt: skip
            adapter = version or "sft"
            f, d = window.feedback, window.drafts
            for name, value in (("edit_rate", f.edit_rate), ("edit_size", f.edit_size),
                                ("thumbs_down_rate", f.thumbs_down_rate),
                                ("unsupported_rate", d.unsupported_rate),
                                ("policy_compliance", d.policy_compliance)):  # fmt: skip
                if value is not None:
                    metrics.canary_rate.labels(adapter, role, name).set(value)
            for kind, n in (("handled", f.handled), ("rated", f.rated), ("drafts", d.drafts)):
                metrics.canary_events.labels(adapter, role, kind).set(n)
