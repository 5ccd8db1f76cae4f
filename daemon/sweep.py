"""``alignd sweep-beta``: the same snapshot trained at several β, accuracy plotted against KL.

The DPO checklist's way to choose β: larger β keeps the adapter closer to the reference
(lower KL) at some cost in held-out preference accuracy. Each run is a normal trainer child
process; the plot lands in ``<out>/sweep.html`` (and ``sweep.json`` holds the numbers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon.demo import DEMO_RUN_SPEC
from daemon.report import sweep_png
from trainer.spec import RunSpec


def sweep_beta(
    data: Path, out: Path, betas: list[float], *, base_model: str, extra: list[str]
) -> int:
    out.mkdir(parents=True, exist_ok=True)
    points = []
    for beta in betas:
        run_dir = out / f"beta-{beta:g}"
        spec = json.loads(json.dumps(DEMO_RUN_SPEC))
        spec["hyper"]["beta"] = beta
        spec |= {
            "data": str(data.resolve()),
            "output_dir": str(run_dir.resolve()),
            "base_model": base_model,
        }
        spec["eval"] |= {"factuality_set": None, "generate_max_prompts": 0}  # accuracy and KL only
        for item in extra:
            key, _, value = item.partition("=")
            node = spec
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
        RunSpec.model_validate(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run.json").write_text(json.dumps(spec, indent=1))
        print(f"β = {beta:g}: training ({run_dir})", flush=True)
        if subprocess.call([sys.executable, "-m", "trainer.train", str(run_dir / "run.json")]) != 0:
            print(f"β = {beta:g}: run failed, see {run_dir / 'result.json'}", file=sys.stderr)
            continue
        cand = json.loads((run_dir / "result.json").read_text())["eval"]["candidate"]
        points.append(
            {
                "beta": beta,
                "accuracy": cand["preference"]["reward_accuracy"],
                "kl": cand["kl_to_reference"],
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
