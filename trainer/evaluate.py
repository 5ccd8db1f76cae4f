"""Evaluating an adapter against the frozen reference on held-out data.

Everything here runs under ``torch.no_grad()`` in eval mode, for one adapter name of a
``PeftModel`` at a time (``None`` = the reference, i.e. the SFT base). Reference log-probs
are computed once per eval set and reused for every adapter compared on it.

Reports (the typed ``EvalReport`` of ``trainer.spec``, which ``result.json`` holds and the gate
reads):
- preference: implicit-reward accuracy and margin (Rafailov et al. 2023, §5), and
  likelihood-ranking accuracy (mean per-token log-prob of chosen > rejected), which is also
  defined for the reference;
- drift: KL(reference ‖ adapter) summed per reply on the reference's own replies to the retain
  set, prompts unrelated to the feedback (``trainer.retain``), which the gate budgets;
- requested change, reported and judged by the behavioural checks rather than a budget:
  KL(adapter ‖ reference) per token on held-out chosen replies, and KL(reference ‖ adapter) per
  reply on the reference's greedy replies to the held-out prompts;
- factuality: multiple-choice accuracy, the choice with the highest mean log-prob;
- generation: greedy replies to held-out prompts and their degeneracy statistics
  (``trainer.generation``).

:func:`evaluate_run` is the run's whole evaluation, called by the recipe after saving.

Past 400 lines on purpose: every held-out measure and the order they run in (the reference
first: its replies are the text the others' task KL is read on) in one file, as the gate reads
them; the pieces it could lose are already apart (``trainer.generation``, ``trainer.retain``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.data import PairRow, is_snapshot, read_rows, row_tags, to_pairs
from trainer.evalcache import adapter_identity, greedy_replies, remembered
from trainer.generation import generation_stats
from trainer.logprobs import Encoded, collate, encode, response_logits
from trainer.model import evaluating, using_adapter
from trainer.packing import sequence_logps_shared_prefix
from trainer.results import AdapterEval, DriftReport, EvalReport, PreferenceReport
from trainer.retain import drift_report, encode_replies, kl_per_reply, load_prompts
from trainer.spec import RunSpec


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def score(
    model: Any,
    examples: Sequence[Encoded],
    *,
    adapter: str | None,
    pad_id: int,
    batch_size: int = 8,
    progress: str | None = None,
) -> Tensor:
    """Summed response log-probs of ``examples`` under ``adapter`` (None = reference), ``(M,)``."""
    with evaluating(model), using_adapter(model, adapter):
        return sequence_logps_shared_prefix(model, examples, pad_id, batch_size, progress=progress)


@dataclass
class PairEvalSet:
    """Held-out pairs, tokenised once, with their reference log-probs computed once."""

    chosen: list[Encoded]
    rejected: list[Encoded]
    reference_chosen_logps: Tensor
    reference_rejected_logps: Tensor

    @property
    def chosen_lengths(self) -> Tensor:
        return torch.tensor([len(e.response_ids) for e in self.chosen], dtype=torch.float32)

    @property
    def rejected_lengths(self) -> Tensor:
        return torch.tensor([len(e.response_ids) for e in self.rejected], dtype=torch.float32)


def build_pair_eval_set(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[PairRow],
    *,
    max_length: int,
    max_prompt_length: int,
    batch_size: int,
) -> PairEvalSet:
    chosen = [
        encode(
            tokenizer,
            p.prompt,
            p.chosen,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for p in pairs
    ]
    rejected = [
        encode(
            tokenizer,
            p.prompt,
            p.rejected,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        for p in pairs
    ]
    pad = tokenizer.pad_token_id
    return PairEvalSet(
        chosen,
        rejected,
        score(model, chosen, adapter=None, pad_id=pad, batch_size=batch_size),
        score(model, rejected, adapter=None, pad_id=pad, batch_size=batch_size),
    )


def preference_metrics(
    model: Any,
    evalset: PairEvalSet,
    *,
    adapter: str | None,
    beta: float,
    pad_id: int,
    batch_size: int = 8,
) -> PreferenceReport:
    """Held-out preference metrics of ``adapter`` (or of the reference when None)."""
    if adapter is None:
        chosen, rejected = evalset.reference_chosen_logps, evalset.reference_rejected_logps
    else:
        chosen = score(model, evalset.chosen, adapter=adapter, pad_id=pad_id, batch_size=batch_size)
        rejected = score(
            model, evalset.rejected, adapter=adapter, pad_id=pad_id, batch_size=batch_size
        )
    chosen_pt = chosen / evalset.chosen_lengths
    rejected_pt = rejected / evalset.rejected_lengths
    rewards: dict[str, float] = {}  # the reference's implicit reward is 0 by definition
    if adapter is not None:
        chosen_rewards = beta * (chosen - evalset.reference_chosen_logps)
        rejected_rewards = beta * (rejected - evalset.reference_rejected_logps)
        margins = chosen_rewards - rejected_rewards
        rewards = {
            "reward_accuracy": float((margins > 0).float().mean()),
            "reward_margin": float(margins.mean()),
            "chosen_rewards": float(chosen_rewards.mean()),
            "rejected_rewards": float(rejected_rewards.mean()),
        }
    return PreferenceReport(
        num_pairs=len(evalset.chosen),
        ranking_accuracy=float((chosen_pt > rejected_pt).float().mean()),
        chosen_logps_per_token=float(chosen_pt.mean()),
        rejected_logps_per_token=float(rejected_pt.mean()),
        chosen_logps=float(chosen.mean()),
        **rewards,
    )


@torch.no_grad()
def kl_to_reference(
    model: Any, examples: Sequence[Encoded], *, adapter: str, pad_id: int, batch_size: int = 8
) -> float:
    """Mean per-token KL(adapter ‖ reference) on teacher-forced responses, in nats.

    Exact over the vocabulary at every response position: Σ_v p_a(v) (log p_a(v) − log p_ref(v)).
    """
    if not examples:
        return 0.0
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with evaluating(model):
        for chunk in _chunks(examples, batch_size):
            batch = collate(chunk, pad_id, device)
            with using_adapter(model, adapter):
                adapter_logp = F.log_softmax(response_logits(model, batch), dim=-1)
            with using_adapter(model, None):
                reference_logp = F.log_softmax(response_logits(model, batch), dim=-1)
            kl = (adapter_logp.exp() * (adapter_logp - reference_logp)).sum(-1)
            total += float(kl.sum())
            tokens += int(kl.numel())
    return total / max(tokens, 1)


def load_factuality_set(name: str | None) -> list[dict[str, Any]]:
    """``'default'`` is the shipped general-knowledge set; otherwise a JSONL path."""
    if name is None:
        return []
    if name == "default":
        text = (Path(__file__).parent / "data" / "factuality.jsonl").read_text()
    else:
        text = Path(name).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


NEUTRAL_PROMPT = "Answer:"


def factuality(
    model: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    *,
    adapter: str | None,
    batch_size: int = 16,
) -> float:
    """Multiple-choice accuracy over ``{question, choices, answer}`` items (``answer`` = index).

    Each choice is scored as the model's reply to the question, calibrated by its log-prob as
    a reply to a content-free prompt: log p(choice | question) − log p(choice | "Answer:")
    (PMI_DC, Holtzman et al. 2021, §3). Raw likelihood mostly rewards short, common answers;
    measured on the shipped set with SmolLM2-135M-Instruct: 36% (mean log-prob), 44% (summed),
    50% (calibrated), chance 25%.
    """
    if not questions:
        return float("nan")
    pairs = [(q["question"], str(c)) for q in questions for c in q["choices"]]
    pad = tokenizer.pad_token_id
    conditional = score(
        model,
        [encode(tokenizer, q, c) for q, c in pairs],
        adapter=adapter,
        pad_id=pad,
        batch_size=batch_size,
    )
    neutral = score(
        model,
        [encode(tokenizer, NEUTRAL_PROMPT, c) for _, c in pairs],
        adapter=adapter,
        pad_id=pad,
        batch_size=batch_size,
    )
    calibrated = conditional - neutral
    correct, i = 0, 0
    for q in questions:
        n = len(q["choices"])
        correct += int(int(calibrated[i : i + n].argmax()) == int(q["answer"]))
        i += n
    return correct / len(questions)


def heldout_prompts(
    spec: RunSpec, pairs: list[PairRow], rows: list[dict[str, Any]]
) -> list[tuple[Any, dict[str, str]]]:
    """(prompt, tags) for the greedy-reply checks: held-out pairs' prompts, then held-out
    thumbs', each prompt once (first seen)."""
    prompted = [(p.prompt, row_tags(r)) for p, r in zip(pairs, rows, strict=True)]
    if not spec.eval_data and is_snapshot(spec.data):
        prompted += [
            (r["prompt"], row_tags(r)) for r in read_rows(spec.data, kind="kto", split="heldout")
        ]
    unique: dict[str, tuple[Any, dict[str, str]]] = {}
    for prompt, tags in prompted:
        unique.setdefault(json.dumps(prompt, sort_keys=True), (prompt, tags))
    return list(unique.values())[: spec.eval.generate_max_prompts]


def _stage(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def retain_drift(
    spec: RunSpec,
    model: Any,
    tokenizer: Any,
    adapters: dict[str, str | None],
    identities: dict[str, str | None],
) -> dict[str, DriftReport]:
    """Each adapter's drift on the retain set (not the reference's: the same forward twice is 0
    by construction); ``identities`` name the models, as in :func:`evaluate_run`."""
    if spec.eval.retain_set is None:
        return {}
    prompts = load_prompts(spec.eval.retain_set, shipped="eval")
    _stage(f"eval: drift on {len(prompts)} retain prompts")
    cache_dir = spec.reference_cache.parent if spec.reference_cache is not None else None
    cap, pad, bs = spec.eval.retain_max_new_tokens, tokenizer.pad_token_id, spec.eval.batch_size
    replies = greedy_replies(
        model,
        tokenizer,
        prompts,
        adapter=None,
        identity=str(identities["reference"]),
        max_new_tokens=cap,
        batch_size=spec.eval.generate_batch_size,
        cache_dir=cache_dir,
    )
    examples = encode_replies(tokenizer, prompts, replies)

    def drift(adapter: str) -> DriftReport:
        return drift_report(
            *kl_per_reply(model, examples, adapter=adapter, pad_id=pad, batch_size=bs)
        )

    return {
        name: remembered(
            cache_dir if identities[name] else None,
            "drift",
            [identities[name], prompts, cap],
            partial(drift, a),
            dump=lambda report: report.model_dump(mode="json"),
            load=DriftReport.model_validate,
        )
        for name, a in adapters.items()
        if a is not None
    }


# Every held-out measure per adapter in the order they must run (~120 lines): the reference's
# replies first, since the others' task KL is read on them.
def evaluate_run(
    spec: RunSpec, model: Any, tokenizer: Any, identity: str, candidate_dir: Path | None
) -> EvalReport:
    """Candidate (``default``), incumbent (if given) and reference on the held-out split.

    Cost: one reference pass over the held-out pairs, then per adapter a scoring pass, an
    exact-KL pass (two forwards), greedy generation of up to ``eval.generate_max_prompts``
    replies, two forwards over the reference's replies for the task and retain KLs, and the
    factuality set (two scoring passes per choice) — greedy generation and factuality dominate
    on CPU. ``identity`` names the base; greedy replies, factuality and drift are kept per
    model (:mod:`trainer.evalcache`): the reference's once per base, an adapter's once per set
    of weights, so the incumbent's are usually read from the run that trained it.
    ``candidate_dir`` is the saved candidate (None: its results are not kept, e.g. where a rank
    may read the file before rank 0 has written it).
    """
    source = spec.eval_data or spec.data
    heldout_split = "train" if spec.eval_data else "heldout"
    rows = (
        read_rows(source, kind="pairs", split=heldout_split)
        if (spec.eval_data or source.is_dir())
        else []
    )
    adapters: dict[str, str | None] = {"candidate": "default", "reference": None}
    if spec.incumbent_adapter is not None:
        model.load_adapter(
            str(spec.incumbent_adapter), adapter_name="incumbent", is_trainable=False
        )
        adapters["incumbent"] = "incumbent"
    identities = {
        "reference": identity,
        "candidate": adapter_identity(identity, candidate_dir) if candidate_dir else None,
        "incumbent": adapter_identity(identity, spec.incumbent_adapter)
        if spec.incumbent_adapter
        else None,
    }
    report: dict[str, dict[str, Any]] = {name: {} for name in adapters}
    cache_dir = spec.reference_cache.parent if spec.reference_cache is not None else None
    pad, bs, hp = tokenizer.pad_token_id, spec.eval.batch_size, spec.hyper
    if rows:
        pairs = to_pairs(rows)
        evalset = build_pair_eval_set(
            model,
            tokenizer,
            pairs,
            max_length=hp.max_length,
            max_prompt_length=hp.max_prompt_length,
            batch_size=bs,
        )
        kl_examples = evalset.chosen[: spec.eval.kl_max_examples]
        prompted = heldout_prompts(spec, pairs, rows)
        prompts, tags = [p for p, _ in prompted], [t for _, t in prompted]
        task_examples: list[Encoded] = []
        # the reference first: its replies are the text the others' task KL is measured on
        for name, adapter in sorted(adapters.items(), key=lambda item: item[1] is not None):
            _stage(f"eval {name}: held-out preference, KL, {len(prompts)} greedy replies")
            report[name]["preference"] = preference_metrics(
                model, evalset, adapter=adapter, beta=hp.beta, pad_id=pad, batch_size=bs
            )
            report[name]["kl_to_reference"] = (
                0.0
                if adapter is None
                else kl_to_reference(model, kl_examples, adapter=adapter, pad_id=pad, batch_size=bs)
            )
            if prompts:
                replies = greedy_replies(  # the same every time for the prompts it has seen
                    model,
                    tokenizer,
                    prompts,
                    adapter=adapter,
                    identity=str(identities[name]),
                    max_new_tokens=spec.eval.max_new_tokens,
                    batch_size=spec.eval.generate_batch_size,
                    cache_dir=cache_dir if identities[name] else None,
                )
                report[name]["generation"] = generation_stats(
                    replies,
                    prompts,
                    tags=tags,
                    grounding=spec.eval.grounding,
                    policy_rules=spec.eval.policy_rules,
                )
                if adapter is None:  # its own KL on its own replies is 0: nothing to measure
                    task_examples = encode_replies(tokenizer, prompts, replies)[
                        : spec.eval.kl_max_examples
                    ]
                    continue
                report[name]["task_kl"] = drift_report(
                    *kl_per_reply(model, task_examples, adapter=adapter, pad_id=pad, batch_size=bs)
                )
    if spec.eval.curated_pairs is not None:
        curated = build_pair_eval_set(
            model,
            tokenizer,
            to_pairs(read_rows(spec.eval.curated_pairs)),
            max_length=hp.max_length,
            max_prompt_length=hp.max_prompt_length,
            batch_size=bs,
        )
        for name, adapter in adapters.items():
            _stage(f"eval {name}: curated preference set")
            report[name]["curated"] = preference_metrics(
                model, curated, adapter=adapter, beta=hp.beta, pad_id=pad, batch_size=bs
            )
    for name, drift in retain_drift(spec, model, tokenizer, adapters, identities).items():
        report[name]["retain_kl"] = drift
    questions = load_factuality_set(spec.eval.factuality_set)[: spec.eval.factuality_limit]
    if questions:
        for name, adapter in adapters.items():
            _stage(f"eval {name}: factuality on {len(questions)} questions")
            report[name]["factuality"] = remembered(
                cache_dir if identities[name] else None,
                "factuality",
                [identities[name], questions],
                partial(
                    factuality, model, tokenizer, questions, adapter=adapter, batch_size=2 * bs
                ),
            )
    return EvalReport(**{name: AdapterEval(**parts) for name, parts in report.items()})
