"""What each console page shows, gathered from :class:`daemon.operations.Operations` alone and
handed to its template (``templates/<page>.html``) as one object."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.console.render import Chart, ReplyPair, chart, reply_pair
from daemon.operations import AdapterSummary, AuditEntry, Operations, ServiceStatus
from daemon.records import AdapterDetail
from feedback.production import AdapterFeedback
from trainer.results import GenerationReport, RunResult

FEEDBACK_DAYS = 7


@dataclass
class Session:
    admin: bool
    actor: str
    csrf: str
    expires: float


@dataclass
class Overview:
    session: Session
    revision: str  # the registry as the page saw it: an action from it acts only if still current
    status: ServiceStatus
    versions: list[AdapterSummary]  # newest first
    registered_by: dict[str, str]
    drift_at_eval: Chart
    drift_probe: Chart


@dataclass
class VersionView:
    session: Session
    revision: str
    detail: AdapterDetail
    registered_by: str
    audit: list[AuditEntry]
    curves: list[Chart]  # empty: the run directory is gone (retention)
    replies: list[ReplyPair]
    replies_note: str  # why there are no replies, when there are none
    feedback: AdapterFeedback

    @property
    def can_promote(self) -> bool:
        return self.detail.state in {"candidate", "rejected", "retired"}

    @property
    def needs_force(self) -> bool:
        return not self.detail.manifest.gate_passed or self.detail.state == "rejected"

    @property
    def can_canary(self) -> bool:
        """The gate allows it a canary (its tier), and it is not serving."""
        gate = self.detail.manifest.gate
        return (self.detail.state in {"candidate", "rejected", "retired"} and gate is not None
                and gate.tier in {"canary", "stable"})  # fmt: skip

    @property
    def can_reject(self) -> bool:
        return self.detail.state in {"candidate", "retired"}


def _registered_by(entries: list[AuditEntry]) -> dict[str, str]:
    return {e.version: e.actor for e in entries if e.action == "register" and e.version}


def overview(ops: Operations, session: Session) -> Overview:
    revision = ops.revision()  # first: a change after this makes the page's forms stale
    versions = ops.adapters()
    evaluated = [(float(i + 1), v.drift) for i, v in enumerate(versions) if v.drift is not None]
    probes = [(i + 1.0, p.kl) for i, p in enumerate(ops.drift_history(200))]
    return Overview(
        session=session,
        revision=revision,
        status=ops.status(),
        versions=list(reversed(versions)),
        registered_by=_registered_by(ops.audit(limit=10_000)),
        drift_at_eval=chart({"drift": evaluated}, x_label="version number", y_label="nats"),
        drift_probe=chart({"drift probe": probes}, x_label="probe", y_label="nats"),
    )


def version_view(ops: Operations, session: Session, version: str) -> VersionView:
    """:class:`~daemon.registry.VersionNotFound` when there is no such version."""
    revision = ops.revision()
    detail = ops.adapter(version)
    audit = ops.audit(version=version, limit=10_000)
    result = ops.run_result(detail.manifest.run_id or "")
    pairs, note = held_out_replies(result, detail.manifest.parent)
    since = datetime.now(UTC) - timedelta(days=FEEDBACK_DAYS)
    return VersionView(
        session=session,
        revision=revision,
        detail=detail,
        registered_by=_registered_by(audit).get(version, ""),
        audit=audit,
        curves=curves(result),
        replies=pairs,
        replies_note=note,
        feedback=ops.production_feedback(version, since),
    )


def curves(result: RunResult | None) -> list[Chart]:
    """The run's loss, and its reward accuracy and margin, per step (``trainer.steps``)."""
    if result is None or not result.steps:
        return []

    def series(key: str) -> list[tuple[float, float]]:
        values = [(s.step, getattr(s, key)) for s in result.steps]
        return [(float(step), float(value)) for step, value in values if value is not None]

    return [
        chart({"loss": series("loss")}, x_label="step", y_label="loss"),
        chart(
            {
                "reward accuracy": series("reward_accuracy"),
                "reward margin": series("reward_margin"),
            },
            x_label="step",
            y_label="rewards",
        ),
    ]


def last_user_turn(prompt: Any) -> str:
    turns = prompt if isinstance(prompt, list) else []
    asked = (t.get("content", "") for t in reversed(turns)
             if isinstance(t, dict) and t.get("role") == "user")  # fmt: skip
    return str(next(asked, ""))


def _flags(report: GenerationReport, index: int) -> list[str]:
    return list(report.unsupported[index]) if index < len(report.unsupported) else []


def held_out_replies(result: RunResult | None, parent: str | None) -> tuple[list[ReplyPair], str]:
    """The candidate's greedy replies next to the adapter it was measured against (the active
    one at the time, else the SFT model), or why there are none."""
    if result is None:
        return [], "The replies were removed with the run directory (retention)."
    candidate = result.eval.candidate.generation
    incumbent = result.eval.incumbent.generation if result.eval.incumbent else None
    other = incumbent if incumbent and incumbent.replies else result.eval.reference.generation
    other_name = (
        f"{parent or 'the active adapter'} (active when this one was evaluated)"
        if other is incumbent
        else "the SFT model"
    )
    if candidate is None or other is None or not candidate.replies:
        return [], "This run generated no replies (eval.generate_max_prompts)."
    pairs = []
    for i, (after, before) in enumerate(zip(candidate.replies, other.replies, strict=False)):
        prompt = candidate.prompts[i] if i < len(candidate.prompts) else []
        pairs.append(
            reply_pair(
                last_user_turn(prompt),
                (other_name, before, _flags(other, i)),
                ("this version", after, _flags(candidate, i)),
            )
        )
    return pairs, ""
