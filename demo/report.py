"""The before/after numbers of a refresh and the self-contained HTML report.

Reads a run's ``result.json`` (training curves, eval of candidate and reference with their
greedy replies on held-out prompts) and ``status.json`` (gate decision), and the snapshot's
manifest. Plots are embedded as base64 PNG, so the report is one file.
"""

from __future__ import annotations

import base64
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader

from daemon.console.render import CONSOLE_TEMPLATES, ENV, reply_pair
from demo.rounds import COLUMNS, Round, table_rows
from demo.simulate import apologizes
from feedback.manifest import SnapshotManifest
from trainer.results import AdapterEval, GenerationReport, PreferenceReport, RunResult
from trainer.steps import StepMetrics


@dataclass(frozen=True)
class Row:
    name: str
    reference: float | None
    adapter: float | None
    fmt: str = "{:.3f}"

    def cell(self, value: float | None) -> str:
        return "—" if value is None else self.fmt.format(value)


def _words(text: str) -> int:
    return len(text.split())


def _drift(evaluation: AdapterEval, *, task: bool = False) -> float | None:
    """Nats per reply: on the retain set (drift), or on the reference's task replies."""
    report = evaluation.task_kl if task else evaluation.retain_kl
    return report.nats_per_reply if report is not None else None


def before_after(result: RunResult) -> list[Row]:
    ref, cand = result.eval.reference, result.eval.candidate
    ref_gen = ref.generation or GenerationReport()
    cand_gen = cand.generation or GenerationReport()
    ref_pref = ref.preference or PreferenceReport()
    cand_pref = cand.preference or PreferenceReport()

    def apology_rate(replies: Sequence[str]) -> float | None:
        return sum(apologizes(r) for r in replies) / len(replies) if replies else None

    def median_words(replies: Sequence[str]) -> float | None:
        return float(statistics.median(_words(r) for r in replies)) if replies else None

    return [
        Row(
            "apology rate (held-out replies)",
            apology_rate(ref_gen.replies),
            apology_rate(cand_gen.replies),
            "{:.0%}",
        ),
        Row(
            "median reply length (words)",
            median_words(ref_gen.replies),
            median_words(cand_gen.replies),
            "{:.0f}",
        ),
        Row(
            "degenerate replies (empty, <5 words, repetitive)",
            ref_gen.degenerate_rate,
            cand_gen.degenerate_rate,
            "{:.0%}",
        ),
        Row(
            "replies that address the request",
            ref_gen.relevance_rate,
            cand_gen.relevance_rate,
            "{:.0%}",
        ),
        Row(
            "unsupported claims (replies stating a specific the conversation lacks)",
            ref_gen.unsupported_rate,
            cand_gen.unsupported_rate,
            "{:.0%}",
        ),
        Row(
            "grounded (replies stating the record's key fact correctly)",
            ref_gen.grounded_rate,
            cand_gen.grounded_rate,
            "{:.0%}",
        ),
        Row(
            'policy compliance (the refund/billing sentence; "not found" said where it was)',
            ref_gen.policy_compliance,
            cand_gen.policy_compliance,
            "{:.0%}",
        ),
        Row(
            "factuality (115 multiple-choice questions)", ref.factuality, cand.factuality, "{:.1%}"
        ),
        Row(
            "held-out preference accuracy (implicit reward)",
            None,
            cand_pref.reward_accuracy,
            "{:.0%}",
        ),
        Row(
            "held-out ranking accuracy (chosen more likely)",
            ref_pref.ranking_accuracy,
            cand_pref.ranking_accuracy,
            "{:.0%}",
        ),
        Row(
            "held-out chosen log-prob per token",
            ref_pref.chosen_logps_per_token,
            cand_pref.chosen_logps_per_token,
        ),
        Row(
            "drift: KL on the retain set (nats per reply)",
            _drift(result.eval.reference),
            _drift(cand),
            "{:.2f}",
        ),
        Row(
            "requested change: KL on held-out chosen replies (nats/token)",
            0.0,
            cand.kl_to_reference,
            "{:.4f}",
        ),
        Row(
            "requested change: KL on the reference's task replies (nats per reply)",
            _drift(result.eval.reference, task=True),
            _drift(cand, task=True),
            "{:.1f}",
        ),
    ]


def targets(rows: list[Row]) -> list[tuple[str, bool, str]]:
    """The demo's acceptance targets (issue #5), each with the measured values."""
    by = {r.name.split(" (")[0]: r for r in rows}

    def get(name: str) -> tuple[float | None, float | None]:
        row = by[name]
        return row.reference, row.adapter

    out = []
    ref, new = get("apology rate")
    ok = ref is not None and new is not None and ref > 0 and (ref - new) / ref >= 0.6
    out.append(("apology rate down ≥ 60% (relative)", ok, f"{ref or 0:.0%} → {new or 0:.0%}"))
    ref, new = get("median reply length")
    ok = ref is not None and new is not None and ref > 0 and (ref - new) / ref >= 0.3
    out.append(("median length down ≥ 30%", ok, f"{ref or 0:.0f} → {new or 0:.0f} words"))
    ref, new = get("unsupported claims")
    ok = ref is not None and new is not None and new <= 0.05 and new <= ref
    out.append(
        (
            "unsupported claims ≤ 5% and not above the reference's",
            ok,
            f"{ref or 0:.0%} → {new or 0:.0%}",
        )
    )
    ref, new = get("grounded")
    ok = ref is not None and new is not None and new >= 0.8 and new >= ref + 0.2
    out.append(
        ("grounded ≥ 80% and well above the reference's", ok, f"{ref or 0:.0%} → {new or 0:.0%}")
    )
    _, new = get("policy compliance")
    out.append(
        (
            "policy compliance ≥ 95% (the desk's rules)",
            new is not None and new >= 0.95,
            f"{new or 0:.0%}",
        )
    )
    _, new = get("degenerate replies")
    out.append(("≤ 2% degenerate replies", new is not None and new <= 0.02, f"{new or 0:.1%}"))
    ref, new = get("held-out chosen log-prob per token")
    out.append(
        (
            "held-out chosen log-prob not below the reference's",
            ref is not None and new is not None and new >= ref,
            f"{ref or 0:.3f} → {new or 0:.3f}",
        )
    )
    ref, new = get("factuality")
    out.append(
        (
            "factuality within 2 points",
            ref is not None and new is not None and new >= ref - 0.02,
            f"{ref or 0:.1%} → {new or 0:.1%}",
        )
    )
    _, new = get("held-out preference accuracy")
    out.append(
        ("held-out preference accuracy ≥ 90%", new is not None and new >= 0.9, f"{new or 0:.0%}")
    )
    return out


def text_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'':<{width}}  {'reference (SFT)':>16}  {'candidate':>16}"]
    lines += [
        f"{r.name:<{width}}  {r.cell(r.reference):>16}  {r.cell(r.adapter):>16}" for r in rows
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Example:
    """One held-out prompt and both replies, with what each states that the prompt lacks."""

    record: str  # the lookup result the assistant was given (system message after its header)
    customer: str
    before: str
    after: str
    before_unsupported: list[str]
    after_unsupported: list[str]
    tags: dict[str, str]


def examples(result: RunResult, n: int = 3) -> list[Example]:
    """Held-out examples, one per kind of request first (a "not found" lookup among them)."""
    ref, cand = result.eval.reference.generation, result.eval.candidate.generation
    if ref is None or cand is None or not cand.replies:
        return []
    rows = []
    for i, prompt in enumerate(cand.prompts):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        tags = cand.tags[i] if i < len(cand.tags) else {}
        rows.append(
            Example(
                record=system.partition("Lookup result:")[2].strip(),
                customer=messages[-1]["content"],
                before=ref.replies[i],
                after=cand.replies[i],
                before_unsupported=ref.unsupported[i] if i < len(ref.unsupported) else [],
                after_unsupported=cand.unsupported[i] if i < len(cand.unsupported) else [],
                tags=tags,
            )
        )
    kinds: dict[str, Example] = {}
    for row in rows:
        kind = (
            "not_found" if row.tags.get("lookup") == "not_found" else row.tags.get("category", "")
        )
        kinds.setdefault(kind, row)
    first = sorted(kinds.values(), key=lambda e: e.tags.get("lookup") != "not_found")
    rest = [r for r in rows if r not in first]
    return (first + rest)[:n]


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def training_curves_png(steps: list[StepMetrics]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss", ["loss"]),
        ("rewards", ["reward_chosen", "reward_rejected"]),
        ("reward margin", ["reward_margin"]),
        ("reward accuracy", ["reward_accuracy"]),
        ("chosen log-prob (summed)", ["logp_chosen"]),
        ("KL proxy (|log-ratio| per token)", ["kl_proxy"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    x = [s.step for s in steps]
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            ax.plot(x, [getattr(s, key) for s in steps], label=key.removeprefix("reward_"))
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def before_after_png(rows: list[Row]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [
        r
        for r in rows
        if r.name.startswith(
            ("apology", "median", "unsupported", "grounded", "policy", "factuality")
        )
    ]
    fig, axes = plt.subplots(1, len(picks), figsize=(3.3 * len(picks), 3.2))
    for ax, row in zip(axes, picks, strict=True):
        ax.bar(
            ["reference", "adapter"], [row.reference or 0, row.adapter or 0], color=["#999", "#2a7"]
        )
        ax.set_title(row.name.split(" (")[0], fontsize=10)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def rounds_png(rounds: list[Round]) -> str:
    """Production rates per round (left), and each refresh's training time and KL (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.number}{'' if r.refresh else '+'}\n{r.production.served}"
              + (f" | {r.canary.served}" if r.canary else "") for r in rounds]  # fmt: skip
    x = list(range(len(rounds)))
    fig, (rates, cost) = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, values in (
        ("agents' edit rate", [r.production.edit_rate for r in rounds]),
        ("thumbs-down rate", [r.production.thumbs_down_rate for r in rounds]),
        ("apology rate", [r.production.apology_rate for r in rounds]),
        ("unsupported-claim rate", [r.production.unsupported_rate for r in rounds]),
    ):
        rates.plot(x, [float("nan") if v is None else v for v in values], marker="o", label=name)
    for name, style, values in (  # the canary's share of the same hours, beside stable's
        ("canary: edit rate", "C0--", [r.canary.edit_rate if r.canary else None for r in rounds]),
        ("canary: unsupported", "C3--",
         [r.canary.unsupported_rate if r.canary else None for r in rounds]),
    ):  # fmt: skip
        if any(v is not None for v in values):
            rates.plot(x, [float("nan") if v is None else v for v in values], style, marker="s",
                       label=name)  # fmt: skip
    rates.set_xticks(x, labels)
    rates.set_ylim(0, 1.05)
    rates.set_title("production on each round's fresh requests (served by)")
    rates.legend(fontsize=8)
    rates.grid(alpha=0.3)
    refreshed = [r for r in rounds if r.refresh]
    xs = list(range(len(refreshed)))
    seconds = [(r.refresh.train_s or 0) if r.refresh else 0 for r in refreshed]
    colors = [
        "#2a7" if r.refresh and r.refresh.outcome in {"promoted", "canary"} else "#b55"
        for r in refreshed
    ]
    cost.bar(xs, seconds, color=colors)
    cost.set_xticks(
        xs, [f"round {r.number}\n{r.refresh.mode if r.refresh else ''}" for r in refreshed]
    )
    cost.set_ylabel("training seconds (green: exposed, red: not)")
    kl = cost.twinx()
    kl.plot(xs, [(r.refresh.drift if r.refresh else None) or 0 for r in refreshed], "k^--")
    kl.set_ylabel("drift: KL per retain reply (nats)")
    cost.set_title("each round's refresh")
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def sweep_png(points: list[dict[str, float]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot([p["kl"] for p in points], [p["accuracy"] for p in points], "o-")
    for p in points:
        ax.annotate(
            f"β={p['beta']:g}", (p["kl"], p["accuracy"]), textcoords="offset points", xytext=(6, 4)
        )
    ax.set_xlabel("KL(adapter ‖ reference), nats/token (held-out)")
    ax.set_ylabel("held-out preference accuracy")
    ax.set_title("choosing β: accuracy against drift")
    ax.grid(alpha=0.3)
    png = _png(fig)
    plt.close(fig)
    return png


TEMPLATES = ENV.overlay(
    loader=ChoiceLoader([FileSystemLoader(Path(__file__).parent / "templates"), CONSOLE_TEMPLATES])
)  # the report's own page, the console's macros (one gate table, one replies view)


def html_report(
    *,
    title: str,
    result: RunResult,
    status: dict[str, Any],
    manifest: SnapshotManifest,
    wall_s: float | None = None,
    sweep: list[dict[str, float]] | None = None,
    rounds: list[Round] | None = None,
) -> str:
    rows = before_after(result)
    described = manifest.model_dump(mode="json")
    snapshot = [(k, described[k]) for k in ("counts", "pair_sources", "filtered", "kto_balance",
                                            "events")] + [("sha256", manifest.sha256)]  # fmt: skip
    pairs = [
        reply_pair(ex.customer, ("reference (SFT)", ex.before, ex.before_unsupported),
                   ("candidate adapter", ex.after, ex.after_unsupported), record=ex.record)
        for ex in examples(result, n=6)
    ]  # fmt: skip
    return TEMPLATES.get_template("report.html").render(
        title=title,
        status=status,
        wall_s=wall_s,
        rounds=rounds or [],
        columns=COLUMNS,
        round_rows=table_rows(rounds) if rounds else [],
        rounds_png=rounds_png(rounds) if rounds else "",
        rows=rows,
        targets=targets(rows),
        before_after_png=before_after_png(rows),
        checks=(status.get("gate") or {}).get("checks", []),
        examples=pairs,
        curves_png=training_curves_png(result.steps) if result.steps else "",
        sweep_png=sweep_png(sweep) if sweep else "",
        snapshot=snapshot,
        spec=result.spec,
    )
