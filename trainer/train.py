"""``python -m trainer.train RUN_SPEC.json`` — one LoRA preference-training run.

Reads top to bottom: setup (spec, data, model, reference log-probs) → loop → save → eval.
Writes ``<output_dir>/adapter/`` (PEFT, vLLM-servable) and ``<output_dir>/result.json``.
Exit code 0 only when the adapter was written; 1 for a failed or interrupted run (the result
file says why); 2 for a spec that cannot be used (nothing is loaded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer import detectors
from trainer import losses as L
from trainer.data import DataError, read_rows, rows_sha256, snapshot_sha256, to_pairs, to_unpaired
from trainer.evaluate import (
    build_pair_eval_set,
    factuality,
    generate,
    generation_stats,
    kl_to_reference,
    load_factuality_set,
    preference_metrics,
    score,
)
from trainer.logprobs import Encoded, collate, encode, sequence_logps
from trainer.model import attach_lora, load_base, save_adapter
from trainer.spec import (
    LOG2_AT_INIT,
    PAIRED_METHODS,
    REFERENCE_FREE,
    Hyperparameters,
    RunResult,
    RunSpec,
    SpecError,
    load_spec,
)


class TrainingAborted(RuntimeError):
    """A detector stopped the run; the message says which and why."""


_stop_requested = False


def _request_stop(signum: int, _frame: Any) -> None:
    # Only flip state: the loop notices at the next step boundary and writes an honest result.
    global _stop_requested
    _stop_requested = True


def preference_loss(
    method: str,
    hp: Hyperparameters,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
) -> tuple[L.PairLoss, torch.Tensor]:
    """The paired loss of ``method`` and its total per-example loss (with any NLL term)."""
    raw_chosen = policy_chosen
    if hp.length_normalize and method not in {"ipo", "simpo", "orpo"}:
        policy_chosen, policy_rejected = L.per_token(policy_chosen, chosen_lengths), L.per_token(policy_rejected, rejected_lengths)
        reference_chosen, reference_rejected = L.per_token(reference_chosen, chosen_lengths), L.per_token(reference_rejected, rejected_lengths)
    four = (policy_chosen, policy_rejected, reference_chosen, reference_rejected)
    beta = hp.beta
    if method in {"dpo", "cdpo", "rpo"}:
        out = L.dpo_loss(*four, beta=beta, label_smoothing=hp.label_smoothing)
    elif method == "robust":
        out = L.robust_dpo_loss(*four, beta=beta, label_smoothing=hp.label_smoothing)
    elif method == "ipo":
        out = L.ipo_loss(*four, chosen_lengths, rejected_lengths, beta=beta)
    elif method == "hinge":
        out = L.hinge_loss(*four, beta=beta)
    elif method == "dpop":
        out = L.dpop_loss(*four, beta=beta, lambda_=hp.lambda_)
    elif method == "simpo":
        out = L.simpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, beta=beta, gamma=hp.gamma)
    elif method == "orpo":
        out = L.orpo_loss(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, beta=beta)
    else:
        raise ValueError(f"not a paired method: {method}")
    total = out.losses
    if method in {"rpo", "orpo"}:
        total = total + hp.rpo_alpha * L.nll_loss(raw_chosen, chosen_lengths)
    return out, total


def lr_lambda(hp: Hyperparameters, total_steps: int) -> Any:
    """Linear warmup, then cosine / linear decay to 0, or constant."""
    warmup = int(hp.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if hp.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if hp.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(choice)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def reference_logps(model: Any, examples: list[Encoded], pad_id: int, batch_size: int) -> torch.Tensor:
    """Reference (SFT, adapter disabled) log-probs of every example, once, before training.

    They never change during a run, so a second forward per step would be pure waste.
    """
    return score(model, examples, adapter=None, pad_id=pad_id, batch_size=batch_size)


def _encode_all(tokenizer: Any, prompts_responses: list[tuple[Any, str]], hp: Hyperparameters) -> list[Encoded]:
    return [encode(tokenizer, p, r, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length) for p, r in prompts_responses]


def train(spec: RunSpec, result: RunResult) -> None:
    hp, method = spec.hyper, spec.method
    paired = method in PAIRED_METHODS
    out_dir = spec.output_dir
    timings = result.timings
    t_setup = time.perf_counter()

    # --- setup: data first (cheap, fails fast), then the model -----------------------------
    generator = seed_everything(spec.seed)
    rows = read_rows(spec.data, kind="pairs" if paired else "kto", split="train")
    if not paired and not rows:  # KTO can also learn from pairs split into two rows each
        rows = read_rows(spec.data, kind="pairs", split="train")
    if not rows:
        raise DataError(f"{spec.data}: no training rows for method {method!r}")
    result.dataset_sha256 = spec.dataset_sha256 or snapshot_sha256(spec.data) or rows_sha256(rows)
    device = pick_device(spec.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    model, tokenizer = load_base(spec.base_model, device)
    for module in model.modules():  # dropout in the base would make policy != reference at step 0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = attach_lora(model, spec.lora, spec.init_adapter)
    pad_id = tokenizer.pad_token_id
    eval_bs = spec.eval.batch_size

    if paired:
        pairs = to_pairs(rows)
        chosen = _encode_all(tokenizer, [(p.prompt, p.chosen) for p in pairs], hp)
        rejected = _encode_all(tokenizer, [(p.prompt, p.rejected) for p in pairs], hp)
        n_examples = len(pairs)
        if method in REFERENCE_FREE:
            ref_chosen = ref_rejected = torch.zeros(n_examples)
        else:
            ref_chosen = reference_logps(model, chosen, pad_id, eval_bs)
            ref_rejected = reference_logps(model, rejected, pad_id, eval_bs)
    else:
        unpaired = to_unpaired(rows)
        examples = _encode_all(tokenizer, [(u.prompt, u.completion) for u in unpaired], hp)
        desirable_all = torch.tensor([u.desirable for u in unpaired])
        n_examples = len(unpaired)
        ref_logps = reference_logps(model, examples, pad_id, eval_bs)
        # KTO's KL estimate z0 pairs each prompt with another row's completion (mismatched);
        # the pairing is fixed per dataset so its reference terms are computed once.
        kl_examples = _encode_all(tokenizer, [(u.prompt, unpaired[(i + 1) % n_examples].completion) for i, u in enumerate(unpaired)], hp)
        ref_kl_logps = reference_logps(model, kl_examples, pad_id, eval_bs) if method == "kto" else torch.zeros(n_examples)
    result.num_train_examples = n_examples
    timings["setup_s"] = time.perf_counter() - t_setup

    per_step = hp.batch_size * hp.grad_accum
    total_steps = hp.max_steps or max(1, math.ceil(hp.epochs * n_examples / per_step))
    result.num_steps = total_steps
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp, total_steps))
    check_log2 = method in LOG2_AT_INIT and spec.init_adapter is None
    margins: list[float] = []
    chosen_per_token: list[float] = []

    def order() -> list[int]:
        return torch.randperm(n_examples, generator=generator).tolist()

    queue: list[int] = []
    model.train()
    t_loop = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"{method} training", unit="step", file=sys.stderr, dynamic_ncols=True)

    # --- loop ----------------------------------------------------------------------------
    for step in range(total_steps):
        if _stop_requested:
            result.status = "interrupted"
            raise TrainingAborted(f"stopped by signal before step {step}")
        t_step = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(hp.grad_accum):
            while len(queue) < hp.batch_size:
                queue.extend(order())
            idx, queue = queue[: hp.batch_size], queue[hp.batch_size :]
            with autocast:
                if paired:
                    # Chosen and rejected in one forward: one pass over the weights, not two.
                    batch = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id, device)
                    logps = sequence_logps(model, batch)
                    lengths = batch.lengths.float()
                    pc, pr = logps[: len(idx)], logps[len(idx) :]
                    lc, lr = lengths[: len(idx)], lengths[len(idx) :]
                    rc, rr = ref_chosen[idx].to(device), ref_rejected[idx].to(device)
                    out, total = preference_loss(method, hp, pc, pr, rc, rr, lc, lr)
                    stats = {
                        "rewards/chosen": out.chosen_rewards, "rewards/rejected": out.rejected_rewards,
                        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
                        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
                        "logps/chosen": pc.detach(), "logps/rejected": pr.detach(),
                        "logps/chosen_per_token": (pc / lc).detach(),
                        "logratio_margin": ((pc - rc) - (pr - rr)).detach(),
                        "kl_proxy": torch.cat([(pc - rc).abs() / lc, (pr - rr).abs() / lr]).detach(),
                        "preference_loss": out.losses.detach(),
                    }
                else:
                    batch = collate([examples[i] for i in idx], pad_id, device)
                    desirable = desirable_all[idx].to(device)
                    logps = sequence_logps(model, batch)
                    ref = ref_logps[idx].to(device)
                    if method == "kto":
                        with torch.no_grad():  # z0 is a detached baseline (KTO paper §4.1)
                            kl_batch = collate([kl_examples[i] for i in idx], pad_id, device)
                            kl_estimate = (sequence_logps(model, kl_batch) - ref_kl_logps[idx].to(device)).mean().clamp(min=0)
                        uout = L.kto_loss(logps, ref, desirable, kl_estimate, beta=hp.beta, desirable_weight=hp.desirable_weight, undesirable_weight=hp.undesirable_weight)
                    else:
                        kl_estimate = torch.zeros((), device=device)
                        uout = L.apo_zero_loss(logps, ref, desirable, beta=hp.beta)
                    total = uout.losses
                    logratios = (logps - ref).detach()
                    stats = {
                        "rewards/chosen": uout.rewards[desirable], "rewards/rejected": uout.rewards[~desirable],
                        "logps/chosen": logps.detach()[desirable], "logps/rejected": logps.detach()[~desirable],
                        "logps/chosen_per_token": (logps.detach() / batch.lengths)[desirable],
                        "logratio_desirable": logratios[desirable], "logratio_undesirable": logratios[~desirable],
                        "kl_proxy": logratios.abs() / batch.lengths, "kl_estimate": kl_estimate.reshape(1),
                    }
            loss = total.mean() / hp.grad_accum
            loss.backward()
            tokens += batch.num_tokens
            stats["loss"] = total.detach()
            for key, value in stats.items():
                sums.setdefault(key, []).append(value.float())  # type: ignore[arg-type]

        # clip_grad_norm_ returns a tensor; float() below is the step's one CPU-GPU sync.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics: dict[str, Any] = {"step": step}
        for key, parts in sums.items():
            joined = torch.cat(parts)  # type: ignore[arg-type]
            metrics[key] = float(joined.mean()) if joined.numel() else None
        if not paired and metrics["logratio_desirable"] is not None and metrics["logratio_undesirable"] is not None:
            metrics["logratio_margin"] = metrics["logratio_desirable"] - metrics["logratio_undesirable"]
        if metrics.get("rewards/chosen") is not None and metrics.get("rewards/rejected") is not None:
            metrics.setdefault("rewards/margins", metrics["rewards/chosen"] - metrics["rewards/rejected"])
        elapsed = time.perf_counter() - t_step
        metrics |= {"grad_norm": float(grad_norm), "learning_rate": scheduler.get_last_lr()[0], "tokens": tokens, "step_s": elapsed, "tokens_per_s": tokens / elapsed}
        result.steps.append(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics.get('rewards/accuracies') or 0:.2f}", tok_s=f"{metrics['tokens_per_s']:.0f}")

        # --- detectors ------------------------------------------------------------------
        finding = detectors.non_finite_loss(metrics["loss"], step)
        result.detectors["non_finite_loss"] = finding.as_dict()
        if finding.fired:
            raise TrainingAborted(finding.detail)
        if step == 0 and check_log2:
            finding = detectors.reference_mismatch(metrics["preference_loss"], spec.detectors.log2_tolerance)
            result.detectors["reference_mismatch"] = finding.as_dict()
            if finding.fired:
                raise TrainingAborted(finding.detail)
        if metrics.get("logratio_margin") is not None:
            margins.append(metrics["logratio_margin"])
            chosen_per_token.append(metrics["logps/chosen_per_token"])
        if len(margins) == spec.detectors.sign_check_steps + 1:
            finding = detectors.sign_bug(margins, spec.detectors.sign_check_steps)
            result.detectors["sign_bug"] = finding.as_dict()
            if finding.fired:
                tqdm.write(f"WARNING: possible sign bug: {finding.detail}", file=sys.stderr)
    bar.close()
    timings["train_s"] = time.perf_counter() - t_loop

    finding = detectors.likelihood_collapse(
        chosen_per_token, margins,
        min_steps=spec.detectors.collapse_min_steps, min_drop=spec.detectors.collapse_min_drop,
    )
    result.detectors["likelihood_collapse"] = finding.as_dict()
    if finding.fired:
        tqdm.write(f"WARNING: {finding.detail}", file=sys.stderr)

    # --- save ----------------------------------------------------------------------------
    adapter_dir = out_dir / "adapter"
    save_adapter(model, adapter_dir)
    result.adapter_dir = str(adapter_dir)

    # --- evaluate on held-out data ---------------------------------------------------------
    t_eval = time.perf_counter()
    result.eval = evaluate_run(spec, model, tokenizer)
    timings["eval_s"] = time.perf_counter() - t_eval
    result.status = "succeeded"


def evaluate_run(spec: RunSpec, model: Any, tokenizer: Any) -> dict[str, Any]:
    """Candidate (``default``), incumbent (if given) and reference on the held-out split."""
    source = spec.eval_data or spec.data
    heldout_split = "train" if spec.eval_data else "heldout"
    rows = read_rows(source, kind="pairs", split=heldout_split) if (spec.eval_data or source.is_dir()) else []
    adapters: dict[str, str | None] = {"candidate": "default", "reference": None}
    if spec.incumbent_adapter is not None:
        model.load_adapter(str(spec.incumbent_adapter), adapter_name="incumbent", is_trainable=False)
        adapters["incumbent"] = "incumbent"
    report: dict[str, Any] = {name: {} for name in adapters}
    pad, bs, hp = tokenizer.pad_token_id, spec.eval.batch_size, spec.hyper
    if rows:
        pairs = to_pairs(rows)
        evalset = build_pair_eval_set(model, tokenizer, pairs, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length, batch_size=bs)
        kl_examples = evalset.chosen[: spec.eval.kl_max_examples]
        prompts = [p.prompt for p in pairs[: spec.eval.generate_max_prompts]]
        for name, adapter in adapters.items():
            report[name]["preference"] = preference_metrics(model, evalset, adapter=adapter, beta=hp.beta, pad_id=pad, batch_size=bs)
            report[name]["kl_to_reference"] = 0.0 if adapter is None else kl_to_reference(model, kl_examples, adapter=adapter, pad_id=pad, batch_size=bs)
            if prompts:
                replies = generate(model, tokenizer, prompts, adapter=adapter, max_new_tokens=spec.eval.max_new_tokens, batch_size=bs)
                report[name]["generation"] = generation_stats(replies) | {"replies": replies}
    questions = load_factuality_set(spec.eval.factuality_set)[: spec.eval.factuality_limit]
    if questions:
        for name, adapter in adapters.items():
            report[name]["factuality"] = factuality(model, tokenizer, questions, adapter=adapter, batch_size=2 * bs)
    return report


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _peak_memory(device_used_cuda: bool) -> dict[str, int]:
    peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device_used_cuda:
        peak["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return peak


def write_result(result: RunResult, out_dir: Path) -> None:
    """Atomic write: a reader never sees half a ``result.json``."""
    tmp = out_dir / ".result.json.tmp"
    with tmp.open("w") as f:
        f.write(result.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / "result.json")


def run(spec: RunSpec) -> RunResult:
    """Train, always leaving a ``result.json``; ``status`` says whether the adapter is usable."""
    t0 = time.perf_counter()
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    (spec.output_dir / "run.json").write_text(spec.model_dump_json(indent=1))  # resolved config
    result = RunResult(status="failed", spec=spec.model_dump(mode="json"), method=spec.method, versions=_versions())
    try:
        train(spec, result)
    except TrainingAborted as e:
        result.error = str(e)
        print(f"training aborted: {e}", file=sys.stderr)
    except Exception as e:  # the result file must say what happened, whatever it was
        result.status = "failed"
        result.error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        result.timings["wall_s"] = time.perf_counter() - t0
        result.peak_memory_bytes = _peak_memory(torch.cuda.is_available())
        write_result(result, spec.output_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m trainer.train RUN_SPEC.json", file=sys.stderr)
        return 2
    try:
        spec = load_spec(Path(args[0]))
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _request_stop)
    signal.signal(signal.SIGINT, _request_stop)
    result = run(spec)
    print(json.dumps({"status": result.status, "error": result.error, "output_dir": str(spec.output_dir)}))
    return 0 if result.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
