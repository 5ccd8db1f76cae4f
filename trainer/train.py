"""``python -m trainer.train RUN_SPEC.json`` — one LoRA preference-training run.

Reads top to bottom: setup (spec, data, model) → reference pass (through the cross-run cache)
→ loop (:func:`optimise`; with ``mining.when: after`` a second pass on the candidate's mined
mistakes) → save → evaluation (``trainer.evaluate.evaluate_run``).
Writes ``<output_dir>/adapter/`` (PEFT, vLLM-servable) and ``<output_dir>/result.json``.
Exit code 0 only when the adapter was written; 1 for a failed or interrupted run (the result
file says why); 2 for a spec that cannot be used (nothing is loaded).

Past 400 lines on purpose: the recipe and its loop read top to bottom in one file (as
nanoGPT's train.py does); the retain anchor (``trainer.retain``) and mining (``trainer.mining``) are
their own modules, and only their calls are here.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from trainer import detectors
from trainer.data import DataError, is_snapshot, read_rows, rows_sha256, snapshot_sha256
from trainer.distributed import (
    World,
    close_world,
    full_value,
    held_parameters,
    init_world,
    load_base_for,
    shard_model,
)
from trainer.evaluate import evaluate_run, score
from trainer.logprobs import Encoded
from trainer.methods import Method
from trainer.methods import method as method_info
from trainer.mining import mine_model
from trainer.model import (
    attach_lora,
    enable_activation_checkpointing,
    resolve_base_model,
    save_adapter,
    weight_dtype,
)
from trainer.objectives import Objective, PairedObjective, encode_rows, make_objective
from trainer.refcache import ReferenceCache, model_identity
from trainer.results import RunResult
from trainer.retain import AnchorBatches, build_anchor
from trainer.spec import Hyperparameters, RunSpec, SpecError, load_spec
from trainer.steps import StepMetrics


class TrainingAborted(RuntimeError):
    """A detector stopped the run; the message says which and why."""


_stop_requested = False


def _request_stop(signum: int, _frame: Any) -> None:
    # Only flip state: the loop notices at the next step boundary and writes an honest result.
    global _stop_requested
    _stop_requested = True


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


def reference_logps(
    model: Any, examples: list[Encoded], pad_id: int, batch_size: int
) -> torch.Tensor:
    """Reference (SFT, adapter disabled) log-probs of every example, once, before training.

    They never change during a run, so a second forward per step would be pure waste.
    """
    return score(
        model,
        examples,
        adapter=None,
        pad_id=pad_id,
        batch_size=batch_size,
        progress="reference log-probs",
    )


def step_metrics(step: int, parts: dict[str, list[torch.Tensor]], world: World) -> dict[str, Any]:
    """Means of the micro-batch statistics over every rank; None where no row had the key (KTO)."""
    metrics: dict[str, Any] = {"step": step}
    keys = sorted(parts)
    totals = torch.zeros(len(keys), 2, dtype=torch.float64)
    for i, key in enumerate(keys):
        joined = torch.cat([v.detach().double().reshape(-1).cpu() for v in parts[key]])
        totals[i] = torch.stack([joined.sum(), torch.tensor(float(joined.numel()))])
    world.sum_(totals)  # one collective for all statistics of the step
    for i, key in enumerate(keys):
        total, count = totals[i].tolist()
        metrics[key] = total / count if count else None
    desirable, undesirable = metrics.get("logratio_desirable"), metrics.get("logratio_undesirable")
    if desirable is not None and undesirable is not None:
        metrics["logratio_margin"] = desirable - undesirable
    chosen, rejected = metrics.get("rewards/chosen"), metrics.get("rewards/rejected")
    if chosen is not None and rejected is not None:
        metrics.setdefault("rewards/margins", chosen - rejected)
    return metrics


@dataclass
class Trainee:
    """What every optimisation pass of a run shares: the model and how it runs."""

    spec: RunSpec
    method: Method
    model: Any
    tokenizer: Any
    world: World
    device: torch.device
    autocast: Any
    scaler: Any
    generator: torch.Generator
    identity: str
    check_log2: bool  # the step-0 log 2 check: a fresh adapter on a method that starts there
    half_precision: bool
    anchor: AnchorBatches | None = None
    steps_done: int = 0


def prepare(t: Trainee, rows: list[dict[str, Any]], result: RunResult) -> Objective:
    """Tokenise ``rows`` and fetch their reference log-probs through the cross-run cache.

    The reference never changes during a run (nor across runs on the same base), so the loop
    never runs it: on a refresh this is mostly cache hits, on a first run it costs about one
    eval-mode forward per sequence (a second pass after mining computes only the mined rows).
    """
    t0 = time.perf_counter()
    encoded = encode_rows(t.method, rows, t.tokenizer, t.spec.hyper)
    pad_id = t.tokenizer.pad_token_id
    cache = ReferenceCache(
        t.spec.reference_cache,
        t.identity,
        found_everywhere=t.world.all_true if t.world.sharded else None,
    )
    try:
        reference = {
            name: cache.logps(t.model, examples, reference_logps, pad_id, t.spec.eval.batch_size)
            for name, examples in encoded.reference_inputs(t.method).items()
        }
    finally:
        cache.close()
    result.reference_logps = cache.stats.as_dict()
    result.timings["reference_s"] = result.timings.get("reference_s", 0.0) + (
        time.perf_counter() - t0
    )
    return make_objective(t.method, t.spec.hyper, encoded, reference, pad_id, t.world.sum_)


def mine(t: Trainee, rows: list[dict[str, Any]], result: RunResult) -> list[dict[str, Any]]:
    """The current model's flagged replies to the training rows' prompts, as pairs
    (``trainer.mining``); counted in ``result.mining``, kept in ``mined.jsonl`` for the operator."""
    t0 = time.perf_counter()
    mined, report = mine_model(t.model, t.tokenizer, rows, t.spec.mining, t.spec.eval)
    result.mining = report.as_dict() | {"when": t.spec.mining.when}
    result.timings["mining_s"] = result.timings.get("mining_s", 0.0) + time.perf_counter() - t0
    if t.world.is_main:  # which replies were flagged, and why
        with (t.spec.output_dir / "mined.jsonl").open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in mined)
    tqdm.write(
        f"mined {report.pairs} pairs from {report.sampled} samples "
        f"({report.flagged} flagged: {dict(report.by_flag)})",
        file=sys.stderr,
    )
    return mined


def load_model(
    spec: RunSpec, world: World, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    """The base (quantised or sharded as the spec says) with the LoRA adapter attached."""
    quantize = spec.lora.quantize
    model, tokenizer = load_base_for(world, spec.base_model, device, dtype, quantize)
    if quantize is not None:  # norms in fp32, input grads for the frozen 4-bit base
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=False
        )
    for module in model.modules():  # dropout in the base would make policy != reference at step 0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = attach_lora(model, spec.lora, spec.init_adapter)
    enable_activation_checkpointing(model, spec.hyper.activation_checkpointing)
    if world.sharded:
        shard_model(model, world, device)
    return model, tokenizer


# The recipe's stages in order (~120 lines: setup, reference, anchor, passes, mining, save, eval),
# each timed into result.timings; read top to bottom like the run's log.
def train(spec: RunSpec, result: RunResult) -> None:
    hp = spec.hyper
    method = method_info(spec.method)
    t_setup = time.perf_counter()

    # --- setup: data first (cheap, fails fast), then the model -----------------------------
    generator = seed_everything(spec.seed)
    rows = read_rows(spec.data, kind="pairs" if method.paired else "kto", split="train")
    if not method.paired and is_snapshot(spec.data) and (spec.data_kind == "kto_union" or not rows):
        # KTO also learns from pairs, split into a desirable and an undesirable row each
        rows = rows + read_rows(spec.data, kind="pairs", split="train")
    if not rows:
        raise DataError(f"{spec.data}: no training rows for method {method.name!r}")
    if spec.mining.samples and not method.paired:
        raise DataError("mining adds pairs: it needs a paired method, not " + method.name)
    if hp.sft_epochs and not method.paired:
        raise DataError("hyper.sft_epochs trains on chosen replies: it needs a paired method")
    result.dataset_sha256 = spec.dataset_sha256 or snapshot_sha256(spec.data) or rows_sha256(rows)
    world, device = init_world(pick_device(spec.device), spec.engine)
    if world.size > hp.batch_size:  # a rank without rows would skip the step's collectives
        raise DataError(
            f"hyper.batch_size ({hp.batch_size}) is smaller than the number of processes "
            f"({world.size}): every process needs at least one row per micro-batch"
        )
    dtype = weight_dtype(spec.dtype, device)
    # On CUDA a half-precision base also runs the fp32 LoRA matmuls in that precision; on CPU
    # (and for an fp32 base) every op runs in its weights' dtype. Logits are cast to fp32
    # before any log-softmax, so losses and log-probs are fp32 either way.
    autocast: Any = (
        torch.autocast("cuda", dtype=dtype)
        if device.type == "cuda" and dtype != torch.float32
        else contextlib.nullcontext()
    )
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)

    quantize = spec.lora.quantize
    model, tokenizer = load_model(spec, world, device, dtype)
    held, total = held_parameters(model)
    result.parallel = {
        "engine": world.engine if world.size > 1 else "single",
        "processes": world.size,
        "parameters_held": held,
        "parameters": total,
    }
    t = Trainee(
        spec=spec,
        method=method,
        model=model,
        tokenizer=tokenizer,
        world=world,
        device=device,
        autocast=autocast,
        scaler=scaler,
        generator=generator,
        identity=model_identity(
            resolve_base_model(spec.base_model),
            device.type,
            quantize or str(dtype).removeprefix("torch."),
        ),
        check_log2=method.log2_at_init and spec.init_adapter is None,
        half_precision=dtype != torch.float32 or quantize is not None,
    )
    if spec.mining.samples and spec.mining.when == "before":  # the starting model's mistakes
        rows = rows + mine(t, rows, result)
    objective = prepare(t, rows, result)
    if spec.anchor.weight:
        t_anchor = time.perf_counter()
        t.anchor = build_anchor(
            model,
            tokenizer,
            spec.anchor,
            identity=t.identity,
            batch_size=spec.eval.batch_size,
            generate_batch_size=spec.eval.generate_batch_size,
            cache_dir=spec.reference_cache.parent if spec.reference_cache is not None else None,
        )
        result.anchor = {"replies": len(t.anchor.examples), "reference_bytes": t.anchor.nbytes}
        result.timings["anchor_setup_s"] = time.perf_counter() - t_anchor
    result.timings["setup_s"] = time.perf_counter() - t_setup

    # --- train (and, with mining after, mine the candidate's mistakes and train on) --------
    t_loop = time.perf_counter()
    if hp.sft_epochs and isinstance(objective, PairedObjective):  # OPA-DPO's order
        objective.supervised_only = True
        steps = _steps(hp, objective.num_examples, hp.sft_epochs)
        optimise(t, objective, steps, result, label="supervised pass")
        objective.supervised_only = False
    steps = hp.max_steps or _steps(hp, objective.num_examples, hp.epochs)
    optimise(t, objective, steps, result, label=f"{t.method.name} training")
    if spec.mining.samples and spec.mining.when == "after":
        mined = mine(t, rows, result)
        objective = prepare(t, rows + mined, result)
        steps = _steps(hp, objective.num_examples, spec.mining.second_pass_epochs)
        optimise(t, objective, steps, result, label=f"{t.method.name} training (with mined pairs)")
    result.num_train_examples = objective.num_examples
    result.num_steps = t.steps_done
    mined_in_loop = result.timings.get("mining_s", 0.0) if spec.mining.when == "after" else 0.0
    result.timings["train_s"] = time.perf_counter() - t_loop - mined_in_loop  # before: in setup

    # --- save, then evaluate on held-out data ----------------------------------------------
    # ddp: rank 0 alone holds the whole model and does both. fsdp: every rank gathers the LoRA
    # weights and runs every evaluation forward (each one is a collective); rank 0 writes.
    if not world.is_main and not world.sharded:
        result.status = "succeeded"
        return
    lora_state = (
        {k: full_value(v).cpu() for k, v in model.state_dict().items() if "lora_" in k}
        if world.sharded
        else None
    )
    adapter_dir = spec.output_dir / "adapter"
    if world.is_main:
        save_adapter(model, adapter_dir, lora_state)
        result.adapter_dir = str(adapter_dir)
    t_eval = time.perf_counter()
    # sharded, other ranks may hash the saved file before rank 0 has finished writing it
    candidate_dir = None if world.sharded else adapter_dir
    result.eval = evaluate_run(spec, model, tokenizer, t.identity, candidate_dir)
    result.timings["eval_s"] = time.perf_counter() - t_eval
    result.status = "succeeded"


def _steps(hp: Hyperparameters, n_examples: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * n_examples / (hp.batch_size * hp.grad_accum)))


# The loop reads top to bottom in one function (~130 lines); the complexity counted is the
# detectors, each a line or two, and splitting them out would hide the control flow.
def optimise(  # noqa: C901
    t: Trainee, objective: Objective, total_steps: int, result: RunResult, *, label: str
) -> None:
    """One pass of AdamW with its own warm-up and decay over ``total_steps`` steps; ``label``
    names it on the progress bar."""
    hp, det, world, model = t.spec.hyper, t.spec.detectors, t.world, t.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp, total_steps))
    n_examples = objective.num_examples
    first_pass = t.steps_done == 0
    margins: list[float] = []
    chosen_per_token: list[float] = []
    queue: list[int] = []
    model.train()
    bar = tqdm(
        total=total_steps,
        desc=label,
        unit="step",
        file=sys.stderr,
        disable=not world.is_main,
    )
    for pass_step in range(total_steps):
        step = t.steps_done
        if _stop_requested:
            result.status = "interrupted"
            raise TrainingAborted(f"stopped by signal before step {step}")
        t_step = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = {}
        tokens = 0
        for _ in range(hp.grad_accum):
            while len(queue) < hp.batch_size:  # epochs: reshuffle whenever the queue runs low
                order = torch.randperm(n_examples, generator=t.generator) if hp.shuffle else None
                queue.extend(range(n_examples) if order is None else order.tolist())
            batch, queue = queue[: hp.batch_size], queue[hp.batch_size :]
            idx = world.shard(batch)  # this rank's part of the global micro-batch
            with t.autocast:
                losses, stats, n_tokens = objective.micro_batch(model, idx, t.device)
            # Sum over this rank's rows / global rows: gradients summed over ranks = global mean.
            loss: torch.Tensor = losses.sum() * world.backward_scale / (len(batch) * hp.grad_accum)
            if t.anchor is not None:  # every rank runs the same retain batch: its share is 1/size
                with t.autocast:
                    anchor_kl = t.anchor.kl(model, t.device)
                stats = stats | {"anchor_kl": anchor_kl.detach()}
                loss = loss + t.spec.anchor.weight * anchor_kl.mean() * world.backward_scale / (
                    world.size * hp.grad_accum
                )
            torch.autograd.backward(t.scaler.scale(loss))
            tokens += n_tokens
            for key, value in (stats | {"loss": losses.detach()}).items():
                parts.setdefault(key, []).append(value)

        world.sum_gradients(trainable)  # ddp: all-reduce; fsdp reduce-scattered them already
        t.scaler.unscale_(optimizer)  # fp16 only (otherwise a no-op): clip the true gradients
        # clip_grad_norm_ returns a tensor; reading the metrics below is the step's CPU-GPU sync.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
        t.scaler.step(optimizer)
        t.scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        metrics = step_metrics(step, parts, world)
        tokens = int(world.sum_(torch.tensor(tokens)).item())
        elapsed = time.perf_counter() - t_step
        metrics |= {
            "grad_norm": float(full_value(grad_norm)),
            "learning_rate": scheduler.get_last_lr()[0],
            "tokens": tokens,
            "step_s": elapsed,
            "tokens_per_s": tokens / elapsed,
        }
        result.steps.append(StepMetrics.model_validate(metrics))
        t.steps_done += 1
        bar.update(1)
        accuracy = metrics.get("rewards/accuracies") or 0.0
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", acc=f"{accuracy:.2f}", tok_s=f"{tokens / elapsed:.0f}"
        )

        # --- detectors ------------------------------------------------------------------
        finding = detectors.non_finite_loss(metrics["loss"], step)
        result.detectors["non_finite_loss"] = finding.as_dict()
        if finding.fired:
            raise TrainingAborted(finding.detail)
        if pass_step == 0 and first_pass and t.check_log2:
            finding = (
                detectors.reference_mismatch_per_token(
                    metrics["kl_proxy"], det.half_precision_tolerance
                )
                if t.half_precision
                else detectors.reference_mismatch(metrics["preference_loss"], det.log2_tolerance)
            )
            result.detectors["reference_mismatch"] = finding.as_dict()
            if finding.fired:
                raise TrainingAborted(finding.detail)
        if metrics.get("logratio_margin") is not None:
            margins.append(metrics["logratio_margin"])
            chosen_per_token.append(metrics["logps/chosen_per_token"])
            if len(margins) == det.sign_check_steps + 1 and first_pass:
                finding = detectors.sign_bug(margins, det.sign_check_steps)
                result.detectors["sign_bug"] = finding.as_dict()
                if finding.fired:
                    tqdm.write(f"WARNING: possible sign bug: {finding.detail}", file=sys.stderr)
    bar.close()
    finding = detectors.likelihood_collapse(
        chosen_per_token, margins, min_steps=det.collapse_min_steps, min_drop=det.collapse_min_drop
    )
    result.detectors["likelihood_collapse"] = finding.as_dict()
    if finding.fired:
        tqdm.write(f"WARNING: {finding.detail}", file=sys.stderr)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


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
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        (spec.output_dir / "run.json").write_text(spec.model_dump_json(indent=1))  # resolved config
    result = RunResult(
        status="failed", spec=spec.model_dump(mode="json"), method=spec.method, versions=_versions()
    )
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
        if main_rank:  # under torchrun only rank 0 writes
            write_result(result, spec.output_dir)
        close_world()
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
    print(
        json.dumps(
            {"status": result.status, "error": result.error, "output_dir": str(spec.output_dir)}
        )
    )
    return 0 if result.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
