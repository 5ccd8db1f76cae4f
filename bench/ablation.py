"""``python bench/ablation.py SNAPSHOT OUT [RECIPE ...]`` — recipes side by side on one snapshot.

Trains each recipe (one trainer child at a time: two at once run 4-5x slower here) on the same
snapshot with the demo's evaluation and prints the gate's numbers per recipe in one table:
held-out preference accuracy, unsupported claims, grounded replies, policy compliance,
degenerate replies, factuality, drift on the retain set (with its 95% interval), the
requested change (KL on the reference's task replies), training seconds and the gate's word
at the demo's strictness (``docs/operations.md``). SNAPSHOT is a snapshot directory, e.g.
``.demo/data/snapshots/<sha>`` after ``python -m demo --rounds 1``; its reference cache is
reused when ``--reference-cache`` names it. A recipe already trained in OUT is read, not rerun
(``--retrain`` to redo), so the table can grow one recipe at a time.

Recipes are overrides of the recipe before issue #29 (``demo.run.LEGACY_RUN_SPEC``), or, for
the names that start with ``demo``, of the demo's recipe now (``demo.run.DEMO_RUN_SPEC``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon.child import run_child
from daemon.gate import GateConfig, decide_promotion
from demo.run import DEMO_RUN_SPEC, LEGACY_RUN_SPEC
from feedback.manifest import SnapshotManifest
from trainer.generation import generation_stats
from trainer.results import RunResult
from trainer.spec import RunSpec, deep_merge

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FAST = {"hyper": {"learning_rate": 1e-3}}
ANCHOR = {"anchor": {"weight": 1.0}}
MINED = {"mining": {"samples": 4, "temperature": 0.8, "max_per_prompt": 2, "when": "after"}}

# name -> (what it tests, overrides of the legacy recipe, or of the demo's for demo*)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "today": ("the recipe before #29: RPO, lr 2e-4, 2 epochs", {}),
    "lr1e-3": ("5x the learning rate, nothing else", FAST),
    "lr1e-3+anchor": ("5x lr, retain anchor α 1", deep_merge(FAST, ANCHOR)),
    "lr1e-3+anchor4": ("5x lr, retain anchor α 4", deep_merge(FAST, {"anchor": {"weight": 4.0}})),
    "lr1e-3+anchor0.25": (
        "5x lr, retain anchor α 0.25",
        deep_merge(FAST, {"anchor": {"weight": 0.25}}),
    ),
    "lr1e-3+anchor+mined": (
        "5x lr, anchor α 1, mined pairs after a first pass (4 samples at T 0.8, ≤ 2 per prompt)",
        deep_merge(deep_merge(FAST, ANCHOR), MINED),
    ),
    "lr1e-3+anchor+mined-before": (
        "as above, mined from the starting model before training",
        deep_merge(deep_merge(FAST, ANCHOR), deep_merge(MINED, {"mining": {"when": "before"}})),
    ),
    "demo": ("the demo's recipe now (demo.run.DEMO_RUN_SPEC): 5x lr, anchor α 0.25", {}),
    "demo+mined": ("the demo's recipe, mined pairs after a first pass", MINED),
    "demo+sft": (
        "the demo's recipe after one supervised epoch on the agents' replies (OPA-DPO's order)",
        {"hyper": {"sft_epochs": 1.0}},
    ),
    "demo+mlp": (
        "the demo's recipe with LoRA on the MLP too",
        {"lora": {"target_modules": [*ATTENTION, "gate_proj", "up_proj", "down_proj"]}},
    ),
}


def _spec(name: str, snapshot: Path, out: Path, cache: Path | None) -> RunSpec:
    base = (
        deep_merge(DEMO_RUN_SPEC, RECIPES[name][1])
        if name.startswith("demo")
        else deep_merge(LEGACY_RUN_SPEC, RECIPES[name][1])
    )
    raw = deep_merge(
        base,
        {
            "data": str(snapshot.resolve()),
            "output_dir": str((out / name).resolve()),
            "reference_cache": str(cache.resolve()) if cache else None,
        },
    )
    return RunSpec.model_validate(raw)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def rescored(result: RunResult, spec: RunSpec) -> RunResult:
    """The run's greedy replies scored by today's detectors (``trainer.claims`` may be stricter
    than when the run was trained), so every row reads the same gate."""
    parts = {}
    for name in ("candidate", "reference"):
        evaluation = getattr(result.eval, name)
        g = evaluation.generation
        if g is None or not g.replies:
            continue
        fresh = generation_stats(
            g.replies,
            g.prompts,
            tags=g.tags,
            grounding=spec.eval.grounding,
            policy_rules=spec.eval.policy_rules,
        )
        parts[name] = evaluation.model_copy(update={"generation": fresh})
    return result.model_copy(update={"eval": result.eval.model_copy(update=parts)})


def row(name: str, result: RunResult, gate: GateConfig, manifest: SnapshotManifest) -> list[str]:
    cand, ref = result.eval.candidate, result.eval.reference
    g = cand.generation
    drift, task = cand.retain_kl, cand.task_kl
    decision = decide_promotion(result.eval, result.detectors, gate, manifest.actors)
    return [
        name,
        _pct(cand.preference.reward_accuracy if cand.preference else None),
        _pct(g.unsupported_rate if g else None),
        _pct(g.grounded_rate if g else None),
        _pct(g.policy_compliance if g else None),
        _pct(g.degenerate_rate if g else None),
        f"{(cand.factuality or 0) - (ref.factuality or 0):+.1%}",
        f"{drift.nats_per_reply:.1f} ± {drift.ci95:.1f}" if drift else "—",
        f"{task.nats_per_reply:.0f}" if task else "—",
        f"{result.timings.get('train_s', 0):.0f}",
        "promote" if decision.promote else "reject: " + ", ".join(c.name for c in decision.failed),
    ]


COLUMNS = ["recipe", "pref. acc.", "unsupported", "grounded", "policy", "degenerate",
           "factuality Δ", "drift (nats/reply)", "task KL", "train s", "gate"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--reference-cache", type=Path, default=None)
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args(argv)
    manifest = SnapshotManifest.model_validate_json((args.snapshot / "manifest.json").read_text())
    # the demo's gate: the product defaults (docs/operations.md); the demo sets no override
    gate = GateConfig()
    rows = []
    for name in args.recipes:
        spec = _spec(name, args.snapshot, args.out, args.reference_cache)
        result_path = spec.output_dir / "result.json"
        if args.retrain or not result_path.is_file():
            spec.output_dir.mkdir(parents=True, exist_ok=True)
            (spec.output_dir / "run.json").write_text(spec.model_dump_json(indent=1))
            print(f"{name}: {RECIPES[name][0]} → {spec.output_dir}", file=sys.stderr, flush=True)
            run_child(["-m", "trainer.train", str(spec.output_dir / "run.json")])
        result = RunResult.load(result_path)
        if result.status != "succeeded":
            print(f"{name}: {result.status}: {result.error}", file=sys.stderr)
            continue
        rows.append(row(name, rescored(result, spec), gate, manifest))
        if result.mining:
            print(f"{name}: mined {json.dumps(result.mining)}", file=sys.stderr)
    table = [COLUMNS, *rows]
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in table[1:]:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
