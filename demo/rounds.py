"""What one round of the demo's loop did: production on fresh requests, then a refresh.

A round serves fresh customer requests with the adapter that is active (the SFT model before
the first promotion), plays the desk around its real replies (``demo.simulate``), lets alignd
ingest the feedback and refresh, and records the production numbers and the refresh's outcome.
The production numbers are computed from the round's own events with the daemon's definitions
(``feedback.production.summarize``: an unchanged send is handled, not edited), plus what the
rubric reads in the served replies. With a canary running, its share of the round's requests
is served by the canary and recorded beside the stable adapter's, over the same hours, as the
canary analysis sees them. The regression the last round injects is recorded as its own row,
with what the canary analysis did.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from demo.scenario import Case
from demo.simulate import apologizes, unsupported
from feedback.events import Rejection, parse_event
from feedback.production import summarize
from trainer.results import RunResult


@dataclass(frozen=True)
class Production:
    """What the desk saw of one adapter's replies to one round's requests."""

    served: str  # a version, or "SFT"
    requests: int
    handled: int  # replies agents sent, changed or not
    rated: int  # replies users rated
    edit_rate: float | None
    thumbs_down_rate: float | None
    apology_rate: float
    median_words: float
    unsupported_rate: float


def production(
    served: str | None, cases: list[Case], replies: list[str], messages: list[bytes]
) -> Production:
    events = {e.event_id: e for e in map(parse_event, messages) if not isinstance(e, Rejection)}
    feedback = summarize(events.values())  # a redelivery is one event, as in the store
    n = len(replies)
    return Production(
        served=served or "SFT",
        requests=n,
        handled=feedback.handled,
        rated=feedback.rated,
        edit_rate=feedback.edit_rate,
        thumbs_down_rate=feedback.thumbs_down_rate,
        apology_rate=sum(apologizes(r) for r in replies) / n,
        median_words=float(statistics.median(len(r.split()) for r in replies)),
        unsupported_rate=sum(bool(unsupported(c, r)) for c, r in zip(cases, replies, strict=True))
        / n,
    )


@dataclass(frozen=True)
class Refresh:
    """A round's refresh: the candidate, the gate's word, and what it cost."""

    outcome: str  # promoted | rejected | held | failed ...
    reason: str
    candidate: str | None
    mode: str | None  # full | incremental
    train_rows: int | None
    train_s: float | None
    wall_s: float | None
    drift: float | None  # KL(reference ‖ candidate) per retain reply, the gate's drift
    unsupported_rate: float | None  # on held-out prompts, the candidate's greedy replies
    grounded_rate: float | None
    policy_compliance: float | None


def refresh(run: dict[str, Any], result: RunResult | None) -> Refresh:
    training = run.get("training_data") or {}
    timings = result.timings if result is not None else {}
    generation = result.eval.candidate.generation if result is not None else None
    drift = result.eval.candidate.retain_kl if result is not None else None
    return Refresh(
        outcome=str(run.get("outcome")),
        reason=str(run.get("reason") or ""),
        candidate=run.get("version"),
        mode=training.get("mode"),
        train_rows=result.num_train_examples if result is not None else None,
        train_s=timings.get("train_s"),
        wall_s=timings.get("wall_s"),
        drift=drift.nats_per_reply if drift is not None else None,
        unsupported_rate=generation.unsupported_rate if generation else None,
        grounded_rate=generation.grounded_rate if generation else None,
        policy_compliance=generation.policy_compliance if generation else None,
    )


@dataclass
class Round:
    number: int
    production: Production  # the stable adapter's share of the round
    refresh: Refresh | None = None
    active_after: str | None = None
    events: list[str] = field(default_factory=list)  # what happened to the registry, in words
    canary: Production | None = None  # the canary's share, served in the same hours
    canary_after: str | None = None  # the canary after the round's refresh

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


COLUMNS = (
    "round",
    "served",
    "requests",
    "edit rate",
    "thumbs-down",
    "apology",
    "median words",
    "unsupported",
    "candidate",
    "mode",
    "rows",
    "train s",
    "drift",
    "gate",
    "active after",
)


def _served(p: Production) -> list[str]:
    return [str(p.requests), _pct(p.edit_rate), _pct(p.thumbs_down_rate), _pct(p.apology_rate),
            _num(p.median_words, "{:.0f}"), _pct(p.unsupported_rate)]  # fmt: skip


def table_rows(rounds: list[Round]) -> list[list[str]]:
    """A row per round (the stable adapter's share), and beneath it the canary's share of the
    same hours when one served; the refresh's columns on the stable row."""
    rows = []
    for r in rounds:
        p, f = r.production, r.refresh
        after = (r.active_after or "SFT") + (
            f" + {r.canary_after} canary" if r.canary_after else ""
        )
        label = str(r.number) if f is not None else f"{r.number}+"
        rows.append([
            label, p.served + (" stable" if r.canary else ""), *_served(p),
            (f.candidate or "—") if f else "—", (f.mode or "—") if f else "—",
            _num(f.train_rows, "{:d}") if f else "—", _num(f.train_s, "{:.0f}") if f else "—",
            _num(f.drift, "{:.1f}") if f else "—", f.outcome if f else "—", after,
        ])  # fmt: skip
        if r.canary is not None:
            rows.append([label, f"{r.canary.served} canary", *_served(r.canary),
                         *["" for _ in range(7)]])  # fmt: skip
    return rows


def text_table(rounds: list[Round]) -> str:
    rows = [list(COLUMNS), *table_rows(rounds)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    notes = [f"  round {r.number}: {e}" for r in rounds for e in r.events]
    return "\n".join(lines + notes)
