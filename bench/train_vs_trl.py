"""alignd's trainer against TRL's DPOTrainer: same model, data, LoRA, optimizer, batch, order.

    make bench                  # or: .venv/bin/python bench/train_vs_trl.py [--steps 12]

Needs TRL (``pip install -e .[bench]``; ``make bench`` does it). For each dataset —
(a) the demo's agent-edit pairs, (b) generic pairs with nothing shared after the prompt, (c)
trim edits that keep the draft's opening (see ``scenario_pairs``) —
it runs, each in its own process so peak RSS is each one's own:

  trl           TRL 1.16 ``DPOTrainer`` with a fresh ``peft_config`` and its defaults: the
                reference forward every step, chosen and rejected padded into one batch,
                activation (gradient) checkpointing on, its chunked log-prob LM head;
  alignd cold   ``trainer.train`` with activation checkpointing on too (the same memory
                trade-off) and an empty reference cache: every reference log-prob is
                computed once before the loop;
  alignd warm   the same run again, reference log-probs from the cache, as on every refresh
                after the first for rows already seen;
  alignd fast   warm, with activation checkpointing off (alignd's default: faster, more
                memory).

Identical for both: SmolLM2-135M-Instruct (float32, CPU), DPO (sigmoid) β=0.1, LoRA r=16
α=32 dropout 0 on q/k/v/o, AdamW lr 5e-5 constant, no warm-up, grad-norm clip 1.0, batch 4,
one epoch in file order, the same initial LoRA weights (TRL's fresh adapter is overwritten
with the one alignd starts from — otherwise the random LoRA A matrices would differ and so
would every loss after step 0), and the same token ids (checked, not assumed).

"Training tokens" are what a trainer without sharing runs: prompt + chosen + prompt +
rejected per pair, the same count for both, so tokens/s ratios are time ratios. s/step and
tokens/s leave out step 1 (allocator warm-up) for both. The per-step losses must agree
within ``--tolerance`` (absolute): the math is the same, only the summation order differs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
HYPER = {
    "beta": 0.1,
    "learning_rate": 5e-5,
    "batch_size": 4,
    "grad_accum": 1,
    "warmup_ratio": 0.0,
    "lr_scheduler": "constant",
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_length": 512,
    "max_prompt_length": 256,
    "shuffle": False,
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def initial_adapter(out: Path) -> Path:
    """One random LoRA initialisation, saved, that both trainers start from."""
    import torch
    from peft import get_peft_model

    from trainer.model import load_base

    torch.manual_seed(1234)
    model, _ = load_base("smollm2", torch.device("cpu"))
    get_peft_model(model, lora_config()).save_pretrained(str(out))
    return out


def token_counts(data: Path) -> list[dict[str, int]]:
    """Per pair: prompt, chosen and rejected tokens as both trainers see them."""
    from trainer.data import read_rows, to_pairs
    from trainer.logprobs import encode
    from trainer.model import load_base

    _, tok = load_base("smollm2", __import__("torch").device("cpu"))
    out = []
    for p in to_pairs(read_rows(data)):
        c, r = encode(tok, p.prompt, p.chosen), encode(tok, p.prompt, p.rejected)
        shared = 0
        for x, y in zip(c.response_ids, r.response_ids, strict=False):
            if x != y:
                break
            shared += 1
        out.append(
            {
                "prompt": len(c.prompt_ids),
                "chosen": len(c.response_ids),
                "rejected": len(r.response_ids),
                "shared_response": shared,
                "ids": [list(c.prompt_ids), list(c.response_ids), list(r.response_ids)],
            }
        )
    return out


# ----------------------------------------------------------------------------- children ---


def run_alignd(
    data: Path, init: Path, cache: Path, steps: int, out: Path, checkpointing: int
) -> dict[str, Any]:
    from trainer.spec import RunSpec
    from trainer.train import run

    spec = RunSpec.model_validate(
        {
            "data": str(data),
            "output_dir": str(out),
            "base_model": "smollm2",
            "method": "dpo",
            "hyper": HYPER | {"max_steps": steps, "activation_checkpointing": checkpointing},
            "lora": LORA,
            "init_adapter": str(init),
            "reference_cache": str(cache),
            "eval": {"factuality_set": None, "generate_max_prompts": 0, "kl_max_examples": 0},
            "device": "cpu",
        }
    )
    result = run(spec)
    if result.status != "succeeded":
        raise SystemExit(f"alignd run failed: {result.error}")
    return {
        "losses": [s.loss for s in result.steps],
        "step_s": [s.step_s for s in result.steps],
        "reference_s": result.timings.get("reference_s", 0.0),
        "reference": result.reference_logps,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_trl(data: Path, init: Path, steps: int, out: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trainer.data import read_rows, to_pairs
    from trainer.logprobs import render_prompt
    from trainer.model import resolve_base_model

    torch.manual_seed(0)
    path = resolve_base_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # Standard (not conversational) rows with the chat template already applied: TRL then
    # tokenises prompt and prompt+reply+EOS exactly as alignd does (checked below).
    rows = [
        {"prompt": render_prompt(tok, p.prompt), "chosen": p.chosen, "rejected": p.rejected}
        for p in to_pairs(read_rows(data))
    ]

    class InOrder(DPOTrainer):  # alignd runs in file order too (hyper.shuffle=False)
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return SequentialSampler(self.train_dataset)

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.t)

    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=HYPER["batch_size"],
        gradient_accumulation_steps=1,
        learning_rate=HYPER["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=HYPER["max_grad_norm"],
        max_steps=steps,
        beta=HYPER["beta"],
        loss_type=["sigmoid"],
        max_length=HYPER["max_length"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_dropout=True,
        gradient_checkpointing=True,  # TRL's default, stated so a reader sees it
    )
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora_config(),  # a fresh one, as a TRL user passes it
        callbacks=[StepTimer()],
    )
    weights = load_file(str(init / "adapter_model.safetensors"))
    outcome = set_peft_model_state_dict(trainer.model, weights)
    if outcome.unexpected_keys:
        raise SystemExit(f"initial adapter did not load: {outcome.unexpected_keys[:3]}")
    ids = [
        [list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])]
        for r in trainer.train_dataset
    ]
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "step_s": times, "ids": ids, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------ parent ---


def child(kind: str, **kwargs: Any) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    args = [sys.executable, __file__, "--child", kind, "--child-out", str(result_path)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{kind} child failed (exit {proc.returncode})")
    out: dict[str, Any] = json.loads(result_path.read_text())
    result_path.unlink()
    return out


def rate(tokens: list[int], step_s: list[float], extra_s: float = 0.0) -> tuple[float, float]:
    """(s/step, tokens/s) over steps 2.. (step 1 warms the allocator for both)."""
    t = sum(step_s[1:]) + extra_s
    return sum(step_s[1:]) / max(1, len(step_s) - 1), sum(tokens[1:]) / t


def compare(
    name: str, data: Path, init: Path, steps: int, tolerance: float, work: Path
) -> dict[str, Any]:
    counts = token_counts(data)
    n = len(counts)
    per_pair = [2 * c["prompt"] + c["chosen"] + c["rejected"] for c in counts]
    batch = HYPER["batch_size"]
    tokens = [sum(per_pair[i * batch : (i + 1) * batch]) for i in range(steps)]
    keys = ("prompt", "chosen", "rejected", "shared_response")
    mean = {k: sum(c[k] for c in counts) / n for k in keys}
    print(f"\n== ({name}) {n} pairs, {steps} steps × {batch} pairs; mean tokens: prompt "
          f"{mean['prompt']:.0f}, chosen {mean['chosen']:.0f}, rejected {mean['rejected']:.0f}, "
          f"common response prefix {mean['shared_response']:.1f}")  # fmt: skip
    cache = work / f"{name}-reference.sqlite"
    trl = child("trl", data=data, init=init, steps=steps, out=work / f"{name}-trl")
    common = {"data": data, "init": init, "steps": steps, "cache": cache}
    cold = child("alignd", **common, checkpointing=1, out=work / f"{name}-a1")
    warm = child("alignd", **common, checkpointing=1, out=work / f"{name}-a2")
    fast = child("alignd", **common, checkpointing=0, out=work / f"{name}-a3")
    same_ids = sum(t == c["ids"] for t, c in zip(trl["ids"], counts, strict=False))
    print(f"token ids identical for {same_ids}/{n} pairs (TRL's tokenisation vs alignd's)")

    trl_s, trl_tps = rate(tokens, trl["step_s"])
    width = 36
    print(f"{'':{width}}{'s/step':>8}{'tokens/s':>10}{'peak RSS MB':>13}{'× TRL tok/s':>13}")
    trl_rss = trl["peak_rss_mb"]
    print(f"{'trl DPOTrainer (checkpointing)':{width}}{trl_s:8.2f}{trl_tps:10.0f}{trl_rss:13.0f}"
          f"{1.0:13.2f}")  # fmt: skip
    rows = [
        ("alignd (checkpointing), warm cache", warm, 0.0),
        ("alignd (checkpointing), cold cache", cold, 0.0),
        ("  + its reference pass", cold, cold["reference_s"]),
        ("alignd (no checkpointing), warm", fast, 0.0),
    ]
    ratios = []
    for label, r, extra in rows:
        s, tps = rate(tokens, r["step_s"], extra)
        ratios.append(tps / trl_tps)
        print(f"{label:{width}}{s:8.2f}{tps:10.0f}{r['peak_rss_mb']:13.0f}{tps / trl_tps:13.2f}")
    print(f"reference log-probs: cold run {cold['reference']} in {cold['reference_s']:.1f} s; "
          f"warm run {warm['reference']} in {warm['reference_s']:.1f} s")  # fmt: skip

    print(f"{'step':>4}{'trl loss':>12}{'alignd loss':>13}{'|diff|':>10}")
    worst = 0.0
    for i, (a, b) in enumerate(zip(trl["losses"], warm["losses"], strict=False)):
        worst = max(worst, abs(a - b))
        print(f"{i + 1:4}{a:12.6f}{b:13.6f}{abs(a - b):10.2e}")
    agree = worst <= tolerance and len(trl["losses"]) == len(warm["losses"]) == steps
    print(f"losses agree within {tolerance:g}: {'yes' if agree else 'NO'} (max |diff| {worst:.2e})")
    rss = max(warm["peak_rss_mb"], cold["peak_rss_mb"]) / trl_rss
    return {"warm": ratios[0], "cold": ratios[2], "fast": ratios[3], "rss": rss, "agree": agree}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--replies-cache", type=Path, default=Path(".demo/cache"))
    parser.add_argument("--datasets", default="edit,generic,trim")
    parser.add_argument("--child", choices=["trl", "alignd"])
    parser.add_argument("--child-out", type=Path)
    for name in ("data", "init", "cache", "out"):
        parser.add_argument(f"--{name}", type=Path)
    parser.add_argument("--checkpointing", type=int, default=1)
    args = parser.parse_args()
    if args.child == "trl":
        out = run_trl(args.data, args.init, args.steps, args.out)
    elif args.child == "alignd":
        out = run_alignd(args.data, args.init, args.cache, args.steps, args.out, args.checkpointing)
    if args.child:
        args.child_out.write_text(json.dumps(out))
        return 0

    import torch
    from scenario_pairs import demo_replies, edit_pairs, generic_pairs, trim_pairs, write_pairs

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, CPU, {threads} threads; SmolLM2-135M-Instruct, float32")
    cases, replies = demo_replies(args.replies_cache)
    need = args.steps * HYPER["batch_size"]
    build = {"edit": edit_pairs, "generic": generic_pairs, "trim": trim_pairs}
    targets = {"edit": 2.5, "generic": 1.5}
    summary = {}
    with tempfile.TemporaryDirectory(prefix="alignd-bench-") as tmp:
        work = Path(tmp)
        init = initial_adapter(work / "init-adapter")
        for name in args.datasets.split(","):
            rows = build[name](cases, replies)[:need]
            data = write_pairs(rows, work / f"{name}.jsonl")
            summary[name] = compare(name, data, init, args.steps, args.tolerance, work)

    print("\n== summary: alignd tokens/s ÷ TRL's (both with activation checkpointing)")
    heads = ("warm", "cold+ref", "no ckpt", "RSS÷TRL", "losses", "target")
    print(f"{'':10}" + "".join(f"{h:>10}" for h in heads))
    ok = True
    for name, r in summary.items():
        target = targets.get(name)
        passed = r["agree"] and r["rss"] <= 1.0 and (target is None or r["warm"] >= target)
        ok &= passed
        goal = f"≥{target}" if target else "-"
        cells = [f"{r[k]:10.2f}" for k in ("warm", "cold", "fast", "rss")]
        same = "same" if r["agree"] else "DIFFER"
        verdict = "ok" if passed else "MISSED"
        print(f"{name:10}{''.join(cells)}{same:>10}{goal:>10}  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
