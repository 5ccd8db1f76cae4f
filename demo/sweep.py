"""``python -m demo.sweep`` (``make sweep-beta``): one snapshot trained at several β, held-out
accuracy plotted against KL.

The DPO checklist's way to choose β: larger β keeps the adapter closer to the reference
(lower KL) at some cost in held-out preference accuracy. Each run is a normal trainer child
process; the plot lands in ``<out>/sweep.html`` (and ``sweep.json`` holds the numbers).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from daemon.child import run_child
from demo.report import sweep_png
from demo.run import DEMO_RUN_SPEC
from trainer.results import RunResult
from trainer.spec import DEFAULT_BASE_MODEL, RunSpec, apply_overrides, deep_merge


def sweep_beta(
    data: Path, out: Path, betas: list[float], *, base_model: str, extra: list[str]
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for beta in betas:
        run_dir = out / f"beta-{beta:g}"
        raw = deep_merge(
            DEMO_RUN_SPEC,
            {
                "hyper": {"beta": beta},
                "data": str(data.resolve()),
                "output_dir": str(run_dir.resolve()),
                "base_model": base_model,
                # accuracy and KL only
                "eval": {"factuality_set": None, "generate_max_prompts": 0},
            },
        )
        spec = RunSpec.model_validate(apply_overrides(raw, extra))
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(spec.model_dump_json(indent=1))
        print(f"β = {beta:g}: training ({run_dir})", flush=True)
        if run_child(["-m", "trainer.train", str((run_dir / "run.json").resolve())]) != 0:
            print(f"β = {beta:g}: run failed, see {run_dir / 'result.json'}", file=sys.stderr)
            continue
        result = RunResult.model_validate_json((run_dir / "result.json").read_text())
        candidate = result.eval.candidate
        if candidate.preference is None or candidate.kl_to_reference is None:
            print(f"β = {beta:g}: no held-out pairs to evaluate", file=sys.stderr)
            continue
        points.append(
            {
                "beta": beta,
                "accuracy": candidate.preference.reward_accuracy or 0.0,
                "kl": candidate.kl_to_reference,
            }
        )
        print(
            f"β = {beta:g}: held-out accuracy {points[-1]['accuracy']:.3f}, KL {points[-1]['kl']:.4f}",
            flush=True,
        )
    (out / "sweep.json").write_text(json.dumps(points, indent=1))
    if points:
        (out / "sweep.html").write_text(
            f"<!doctype html><meta charset='utf-8'><title>β sweep</title><h1>β sweep</h1>"
            f"<img src='data:image/png;base64,{sweep_png(points)}'><pre>{json.dumps(points, indent=1)}</pre>"
        )
        print(f"plot: {out / 'sweep.html'}")
    return 0 if len(points) == len(betas) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo.sweep",
        description="Train at several β on one snapshot; plot held-out accuracy against KL.",
    )
    parser.add_argument("--data", required=True, help="a snapshot directory (e.g. from the demo)")
    parser.add_argument(
        "--out", required=True, help="output dir: one run per β, sweep.json, sweep.html"
    )
    parser.add_argument("--betas", default="0.05,0.1,0.3")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="run-spec overrides")
    args = parser.parse_args(argv)
    betas = [float(b) for b in args.betas.split(",")]
    return sweep_beta(
        Path(args.data), Path(args.out), betas, base_model=args.base_model, extra=args.set or []
    )


if __name__ == "__main__":
    sys.exit(main())
