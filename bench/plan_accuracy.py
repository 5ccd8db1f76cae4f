"""The memory planner (``alignd plan``, ``trainer.plan``) against measured peaks, on CPU.

    PYTHONPATH=. .venv/bin/python bench/plan_accuracy.py [--steps 2] [--seq-len 512]

Trains real runs (``python -m trainer.train`` in a child, as the daemon runs it) on pairs whose
sequences fill ``hyper.max_length`` exactly (a short prompt, long replies that differ from their
first token, so no shared reply prefix), evaluation off, and reads each child's peak RSS from
the kernel (``wait4``). Next to it, the planner's estimate for the same setup on CPU (math
attention over the packed rows, the CPU runtime constant), and measured / planned. Models: the
tests' tiny Llama (where the runtime constant dominates) and SmolLM2-135M, in fp32 and bf16,
with and without activation checkpointing. The first row is an interpreter that only imports
the trainer: the measured runtime constant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from trainer.plan import PlanInput, model_shape, plan
from trainer.spec import Hyperparameters, LoraSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MB = 1024**2
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa",
         "lambda", "mu", "nu", "xi", "omicron"]  # fmt: skip


def child_peak(args: list[str]) -> tuple[int, int]:
    """(exit code, peak RSS bytes) of ``python ARGS``."""
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stderr.write(process.stderr.read().decode()[-2000:] if process.stderr else "")
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


def pairs_file(path: Path, n: int) -> Path:
    long = " ".join(WORDS[i % len(WORDS)] for i in range(4000))
    other = " ".join(WORDS[(i * 7 + 3) % len(WORDS)] for i in range(4000))
    rows = [
        {"prompt": f"Question {i}?", "chosen": f"Yes {long}", "rejected": f"No {other}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from conftest import build_tiny_model  # the tests' tiny Llama

    work = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    tiny = build_tiny_model(work / "tiny")
    data = pairs_file(work / "pairs.jsonl", args.batch * args.steps)
    lora, hyper = LoraSpec(), Hyperparameters()
    print(
        f"{'model':<10} {'dtype':<5} {'ckpt':<4} {'seq':>5} {'measured MB':>12} "
        f"{'planned MB':>11} {'measured/planned':>17}   planned parts (MB)"
    )
    code, baseline = child_peak(["-c", "import trainer.train, peft, transformers"])
    runtime = plan(PlanInput(model_shape(str(tiny)), device="cpu")).runtime
    print(f"{'runtime':<10} {'-':<5} {'-':<4} {'-':>5} {baseline / MB:12.0f} {runtime / MB:11.0f} "
          f"{baseline / runtime:17.2f}")  # fmt: skip
    ratios = []
    for name, model in (("tiny", str(tiny)), ("smollm2", "smollm2")):
        seq = min(args.seq_len, 512) if name == "tiny" else args.seq_len
        for dtype in ("fp32", "bf16"):
            for checkpointing in (False, True):
                out = work / f"{name}-{dtype}-{int(checkpointing)}"
                spec = {
                    "data": str(data),
                    "output_dir": str(out),
                    "base_model": model,
                    "dtype": dtype,
                    "hyper": {
                        "max_steps": args.steps,
                        "batch_size": args.batch,
                        "max_length": seq,
                        "max_prompt_length": 64,
                        "warmup_ratio": 0,
                        "activation_checkpointing": int(checkpointing),
                    },
                    "eval": {"factuality_set": None, "generate_max_prompts": 0},
                }
                out.mkdir(parents=True)
                (out / "run.json").write_text(json.dumps(spec))
                code, peak = child_peak(["-m", "trainer.train", str(out / "run.json")])
                estimate = plan(
                    PlanInput(
                        shape=model_shape(model),
                        lora_r=lora.r,
                        targets=tuple(lora.target_modules),
                        batch=args.batch,
                        seq_len=seq,
                        dtype=dtype,  # type: ignore[arg-type]
                        checkpointing=checkpointing,
                        device="cpu",
                        attention="math",
                        pack_tokens=hyper.pack_tokens,
                        gpu_memory_gib=1024,
                    )
                )
                ratio = peak / estimate.total
                ratios.append((name, ratio))
                e = estimate
                parts = (
                    f"weights {e.weights / MB:.0f}, lora+opt {e.lora_optimizer / MB:.0f}, "
                    f"activations {e.activations / MB:.0f}, logits {e.logits / MB:.0f}, "
                    f"runtime {e.runtime / MB:.0f}"
                )
                status = "" if code == 0 else f"  (run failed: exit {code})"
                print(
                    f"{name:<10} {dtype:<5} {'on' if checkpointing else 'off':<4} {seq:5d} "
                    f"{peak / MB:12.0f} {e.total / MB:11.0f} {ratio:17.2f}   {parts}{status}",
                    flush=True,
                )
    smol = [r for n, r in ratios if n == "smollm2"]
    print(f"\nSmolLM2 measured/planned over {len(smol)} runs: {min(smol):.2f}–{max(smol):.2f}")


if __name__ == "__main__":
    main()
