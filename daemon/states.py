"""The daemon's small vocabularies: why a refresh started, how it ended, what changed the
active adapter. Shared by the refresh pipeline, the scheduler, the status API and the metrics
module, whose label values are exactly these (pre-created, so ``rate()`` works from the first
scrape)."""

from __future__ import annotations

from enum import StrEnum


class RefreshTrigger(StrEnum):
    """Why a refresh started (``alignd_refresh_runs_total`` has no trigger label: a run's
    status says it, with the detail)."""

    SCHEDULE = "schedule"
    NEW_PAIRS = "new pairs"
    NEW_RATINGS = "new ratings"
    OPERATOR = "operator request"


class Outcome(StrEnum):
    """How a refresh run ended (``alignd_refresh_runs_total{outcome}``)."""

    RUNNING = "running"  # only while it runs (status.json); never counted
    PROMOTED = "promoted"
    CANARY = "canary"  # serves a canary beside the stable adapter (rollout)
    HELD = "held"  # passed the gate; gate.policy is manual
    REJECTED = "rejected"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    SKIPPED = "skipped"


FINISHED = tuple(o for o in Outcome if o is not Outcome.RUNNING)
# A refresh that ended like this did its job (the daemon is healthy), whatever the gate said.
SUCCESSFUL = frozenset(
    {Outcome.PROMOTED, Outcome.CANARY, Outcome.HELD, Outcome.REJECTED, Outcome.SKIPPED}
)


class ActivationTrigger(StrEnum):
    """Who changed the active adapter (``alignd_promotions_total``, ``alignd_rollbacks_total``)."""

    GATE = "gate"
    OPERATOR = "operator"
    WATCH = "watch"  # the regression watch rolled a promoted adapter back
    CANARY = "canary"  # the canary analysis widened, promoted or aborted a canary
