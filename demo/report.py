"""The before/after numbers of a refresh and the self-contained HTML report.

Reads a run's ``result.json`` (training curves, eval of candidate and reference with their
greedy replies on held-out prompts) and ``status.json`` (gate decision), and the snapshot's
manifest. Plots are embedded as base64 PNG, so the report is one file.
"""

from __future__ import annotations

import base64
import html
import io
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
            "policy compliance (refund and billing replies with the required sentence)",
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
            "policy compliance ≥ 95% (refund/billing)",
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

    labels = [f"{r.number}{'' if r.refresh else '+'}\n{r.production.served}" for r in rounds]
    x = list(range(len(rounds)))
    fig, (rates, cost) = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, values in (
        ("agents' edit rate", [r.production.edit_rate for r in rounds]),
        ("thumbs-down rate", [r.production.thumbs_down_rate for r in rounds]),
        ("apology rate", [r.production.apology_rate for r in rounds]),
        ("unsupported-claim rate", [r.production.unsupported_rate for r in rounds]),
    ):
        rates.plot(x, [float("nan") if v is None else v for v in values], marker="o", label=name)
    rates.set_xticks(x, labels)
    rates.set_ylim(0, 1.05)
    rates.set_title("production on each round's fresh requests (served by)")
    rates.legend(fontsize=8)
    rates.grid(alpha=0.3)
    refreshed = [r for r in rounds if r.refresh]
    xs = list(range(len(refreshed)))
    seconds = [(r.refresh.train_s or 0) if r.refresh else 0 for r in refreshed]
    colors = [
        "#2a7" if r.refresh and r.refresh.outcome == "promoted" else "#b55" for r in refreshed
    ]
    cost.bar(xs, seconds, color=colors)
    cost.set_xticks(
        xs, [f"round {r.number}\n{r.refresh.mode if r.refresh else ''}" for r in refreshed]
    )
    cost.set_ylabel("training seconds (green: promoted, red: not)")
    kl = cost.twinx()
    kl.plot(xs, [(r.refresh.drift if r.refresh else None) or 0 for r in refreshed], "k^--")
    kl.set_ylabel("drift: KL per retain reply (nats)")
    cost.set_title("each round's refresh")
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


def rounds_html(rounds: list[Round]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{_esc(cell)}</td>" for cell in row) + "</tr>"
        for row in table_rows(rounds)
    )
    events = "".join(f"<li>round {r.number}: {_esc(e)}</li>" for r in rounds for e in r.events)
    return (
        "<h2>Round by round</h2><p>Production numbers are on each round's fresh requests, as "
        "served by the adapter active then; the row marked + is the injected regression.</p>"
        f"<table><tr>{head}</tr>{body}</table><ul>{events}</ul>"
        f"<img src='data:image/png;base64,{rounds_png(rounds)}'>"
    )


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


def _esc(value: Any) -> str:
    return html.escape(str(value))


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
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top}th{background:#f3f3f3}.ok{color:#185}.bad{color:#b22}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
    ]
    outcome = status.get("outcome", "?")
    parts.append(
        f"<p>Run <code>{_esc(status.get('run_id'))}</code>: <b>{_esc(outcome)}</b> — {_esc(status.get('reason'))}"
        f"{f' · demo wall time {wall_s / 60:.1f} min' if wall_s else ''}</p>"
    )
    if rounds:
        parts.append(rounds_html(rounds))
    parts.append(
        f"<h2>Before / after on held-out prompts ({_esc(str(status.get('version') or 'the candidate'))}, "
        f"{_esc(str(status.get('outcome')))})</h2><table><tr><th></th><th>reference (SFT)</th>"
        "<th>candidate adapter</th></tr>"
    )
    parts += [
        f"<tr><td>{_esc(r.name)}</td><td>{r.cell(r.reference)}</td><td>{r.cell(r.adapter)}</td></tr>"
        for r in rows
    ]
    parts.append("</table><h3>Targets</h3><ul>")
    for name, ok, detail in targets(rows):
        parts.append(
            f"<li class='{'ok' if ok else 'bad'}'>{'✔' if ok else '✘'} {_esc(name)}: {_esc(detail)}</li>"
        )
    parts.append(f"</ul><img src='data:image/png;base64,{before_after_png(rows)}'>")
    parts.append(
        "<h2>Gate decision</h2><table><tr><th>check</th><th>passed</th><th>value</th><th>threshold</th>"
        "<th>detail</th></tr>"
    )
    for c in (status.get("gate") or {}).get("checks", []):
        parts.append(
            f"<tr><td>{_esc(c['name'])}</td><td class='{'ok' if c['passed'] else 'bad'}'>{c['passed']}</td>"
            f"<td>{_esc(c['value'])}</td><td>{_esc(c['threshold'])}</td><td>{_esc(c['detail'])}</td></tr>"
        )
    parts.append(
        "</table><h2>Example replies (held-out)</h2><table><tr><th>customer</th><th>reference (SFT)</th>"
        "<th>candidate adapter</th></tr>"
    )
    for ex in examples(result, n=6):

        def flagged(reply: str, claims: list[str]) -> str:
            note = f"<br><small class='bad'>unsupported: {_esc(', '.join(claims))}</small>"
            return _esc(reply) + (note if claims else "")

        record = f"<br><small><pre>{_esc(ex.record)}</pre></small>" if ex.record else ""
        parts.append(
            f"<tr><td>{_esc(ex.customer)}{record}</td><td>{flagged(ex.before, ex.before_unsupported)}"
            f"</td><td>{flagged(ex.after, ex.after_unsupported)}</td></tr>"
        )
    parts.append("</table><h2>Training curves</h2>")
    if result.steps:
        parts.append(f"<img src='data:image/png;base64,{training_curves_png(result.steps)}'>")
    if sweep:
        parts.append(f"<h2>β sweep</h2><img src='data:image/png;base64,{sweep_png(sweep)}'>")
    parts.append("<h2>Dataset snapshot</h2><table>")
    described = manifest.model_dump(mode="json")
    for key in ("counts", "pair_sources", "filtered", "kto_balance", "events"):
        parts.append(f"<tr><th>{_esc(key)}</th><td><code>{_esc(described[key])}</code></td></tr>")
    parts.append(f"<tr><th>sha256</th><td><code>{_esc(manifest.sha256)}</code></td></tr></table>")
    spec = result.spec
    parts.append(
        f"<h2>Recipe</h2><p>method <b>{_esc(spec.get('method'))}</b>, hyperparameters "
        f"<code>{_esc(spec.get('hyper'))}</code>, LoRA <code>{_esc(spec.get('lora'))}</code></p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)
