"""The memory planner (``alignd plan``, ``trainer.plan``) against measured peaks, on CPU.

    PYTHONPATH=. .venv/bin/python bench/plan_accuracy.py [--steps 2] [--seq-len 512] [--dtypes fp32]

Trains real runs (``python -m trainer.train`` in a child, as the daemon runs it) on pairs whose
sequences fill ``hyper.max_length`` exactly (a short prompt, long replies that differ from their
first token, so no shared reply prefix), evaluation off, and reads each child's peak RSS from
the kernel (``wait4``). Each run twice: with glibc's default allocator settings, and with
``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB, so every large tensor is its own mapping, handed
back to the kernel when freed: then the peak RSS follows the live tensors, which is what the
planner estimates (and what a GPU's caching allocator holds). With the defaults glibc raises
its mmap threshold as large blocks are freed and keeps later ones in its heap, so the RSS of a
CPU run stays well above its live memory. Next to both, the planner's estimate for the same
setup on CPU, and measured / planned. Models: the tests' tiny Llama (where the runtime constant
dominates) and SmolLM2-135M, in fp32 and bf16, with and without activation checkpointing. The
first row is an interpreter that only imports the trainer: the measured runtime constant.
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


LIVE = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # large blocks are unmapped when freed


def child_peak(args: list[str], env: dict[str, str] | None = None) -> tuple[int, int]:
    """(exit code, peak RSS bytes) of ``python ARGS``."""
    process = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
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
    parser.add_argument(
        "--dtypes", default="fp32,bf16", help="bf16 on CPU with the fixed threshold is slow"
    )
    args = parser.parse_args()
    from conftest import build_tiny_model  # the tests' tiny Llama

    work = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    tiny = build_tiny_model(work / "tiny")
    data = pairs_file(work / "pairs.jsonl", args.batch * args.steps)
    lora, hyper = LoraSpec(), Hyperparameters()
    print(
        f"{'model':<10} {'dtype':<5} {'ckpt':<4} {'seq':>5} {'live MB':>8} {'glibc MB':>9} "
        f"{'planned MB':>11} {'live/planned':>13} {'glibc/planned':>14}   planned parts (MB)"
    )
    imports = ["-c", "import trainer.train, peft, transformers"]
    (_, baseline), (_, baseline_glibc) = child_peak(imports, LIVE), child_peak(imports)
    runtime = plan(PlanInput(model_shape(str(tiny)), device="cpu")).runtime
    print(f"{'runtime':<10} {'-':<5} {'-':<4} {'-':>5} {baseline / MB:8.0f} "
          f"{baseline_glibc / MB:9.0f} {runtime / MB:11.0f} {baseline / runtime:13.2f} "
          f"{baseline_glibc / runtime:14.2f}")  # fmt: skip
    ratios = []
    for name, model in (("tiny", str(tiny)), ("smollm2", "smollm2")):
        seq = min(args.seq_len, 512) if name == "tiny" else args.seq_len
        for dtype in args.dtypes.split(","):
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
                run = ["-m", "trainer.train", str(out / "run.json")]
                code, peak = child_peak(run, LIVE)
                glibc_code, glibc_peak = child_peak(run)
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
                        pack_tokens=hyper.pack_tokens,
                        gpu_memory_gib=1024,
                    )
                )
                ratio = peak / estimate.total
                ratios.append((name, ratio, glibc_peak / estimate.total))
                e = estimate
                parts = (
                    f"weights {e.weights / MB:.0f}, lora+opt {e.lora_optimizer / MB:.0f}, "
                    f"activations {e.activations / MB:.0f}, logits {e.logits / MB:.0f}, "
                    f"runtime {e.runtime / MB:.0f}"
                )
                failed = [str(c) for c in (code, glibc_code) if c != 0]
                status = f"  (run failed: exit {', '.join(failed)})" if failed else ""
                print(
                    f"{name:<10} {dtype:<5} {'on' if checkpointing else 'off':<4} {seq:5d} "
                    f"{peak / MB:8.0f} {glibc_peak / MB:9.0f} {e.total / MB:11.0f} "
                    f"{ratio:13.2f} {glibc_peak / e.total:14.2f}   {parts}{status}",
                    flush=True,
                )
    live = [r for n, r, _ in ratios if n == "smollm2"]
    glibc = [g for n, _, g in ratios if n == "smollm2"]
    print(
        f"\nSmolLM2 over {len(live)} setups, measured/planned: live {min(live):.2f}–"
        f"{max(live):.2f}, glibc's default RSS {min(glibc):.2f}–{max(glibc):.2f}"
    )


if __name__ == "__main__":
    main()
