"""The retain set: drift where no change is intended, and the anchor that keeps it small.

On a tiny random model whose greedy replies are not blank (``chatty_model_dir``), so the
reference's retain replies have tokens to measure on.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_train import make_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.evalcache as evalcache
import trainer.evaluate as evaluate
from trainer.evalcache import adapter_identity, greedy_replies, remembered
from trainer.logprobs import collate, response_logits
from trainer.results import RunResult
from trainer.retain import (
    AnchorBatches,
    drift_report,
    encode_replies,
    kl_per_reply,
    load_prompts,
    reference_topk,
    topk_kl,
)
from trainer.train import run

PROMPTS = load_prompts("default", shipped="eval")[:6]


@pytest.fixture(scope="module")
def moved(chatty_model_dir: Path) -> tuple[Any, Any, list[Any]]:
    """The chatty model with a LoRA adapter whose B is random (so it differs from the
    reference), and the reference's replies to a few retain prompts."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(chatty_model_dir)
    base = AutoModelForCausalLM.from_pretrained(chatty_model_dir)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="moved")
    replies = greedy_replies(
        model,
        tokenizer,
        PROMPTS,
        adapter=None,
        identity="t",
        max_new_tokens=12,
        batch_size=4,
        cache_dir=None,
    )
    assert all(replies)
    return model, tokenizer, encode_replies(tokenizer, PROMPTS, replies)


def test_drift_is_zero_for_the_reference_and_the_exact_sum_for_an_adapter(moved) -> None:
    model, tokenizer, examples = moved
    pad = tokenizer.pad_token_id
    itself, lengths = kl_per_reply(model, examples, adapter=None, pad_id=pad, batch_size=4)
    assert itself.tolist() == [0.0] * len(examples)
    kls, _ = kl_per_reply(model, examples, adapter="moved", pad_id=pad, batch_size=4)
    # by hand for the first reply, one sequence at a time, direction KL(reference ‖ adapter)
    batch = collate(examples[:1], pad)
    with torch.no_grad():
        with model.disable_adapter():
            p = F.log_softmax(response_logits(model, batch), -1)
        q = F.log_softmax(response_logits(model, batch), -1)
    assert float(kls[0]) == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-4)
    assert int(lengths[0]) == len(examples[0].response_ids)
    report = drift_report(kls, lengths)
    assert report.num_replies == len(examples) and report.nats_per_reply > 0
    sd = float(kls.std())
    assert report.ci95 == pytest.approx(1.96 * sd / math.sqrt(len(examples)))
    assert report.nats_per_token == pytest.approx(float(kls.sum() / lengths.sum()))


def test_topk_with_a_tail_bucket_is_exact_at_full_width_and_a_lower_bound_below(moved) -> None:
    model, tokenizer, examples = moved
    pad, vocab = tokenizer.pad_token_id, len(tokenizer)
    exact, _ = kl_per_reply(model, examples, adapter="moved", pad_id=pad)
    for k, check in ((vocab, "equal"), (8, "below")):
        top = reference_topk(model, examples, k=k, pad_id=pad)
        with torch.no_grad():
            approx = torch.stack(
                [
                    topk_kl(response_logits(model, collate([e], pad)), t).sum()
                    for e, t in zip(examples, top, strict=True)
                ]
            ).double()
        if check == "equal":
            assert approx.tolist() == pytest.approx(exact.tolist(), rel=1e-3, abs=1e-6)
        else:
            assert (approx <= exact + 1e-5).all() and (approx > 0).all()


def test_greedy_replies_are_generated_once_per_model_length_and_prompt(
    moved, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer, _ = moved
    calls = []
    real = evalcache.generate
    monkeypatch.setattr(evalcache, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    kwargs = {"max_new_tokens": 6, "batch_size": 4, "cache_dir": tmp_path}
    first = greedy_replies(model, tokenizer, PROMPTS, adapter=None, identity="base-a", **kwargs)
    again = greedy_replies(model, tokenizer, PROMPTS, adapter=None, identity="base-a", **kwargs)
    assert first == again and len(calls) == 1
    greedy_replies(model, tokenizer, PROMPTS, adapter=None, identity="base-b", **kwargs)
    assert len(calls) == 2  # another base: new replies, never a stale hit
    more = greedy_replies(
        model, tokenizer, [*PROMPTS[:3], "A new prompt?"], adapter=None, identity="base-a", **kwargs
    )
    assert len(calls) == 3 and more[:3] == first[:3]  # only the new prompt is generated
    # an adapter: keyed by its weights, so a byte copy (a registered version) is the same model
    saved, copy, other = tmp_path / "saved", tmp_path / "copy", tmp_path / "other"
    model.save_pretrained(str(saved), selected_adapters=["moved"])
    shutil.copytree(saved / "moved", copy)
    identity = adapter_identity("base-a", saved / "moved")
    assert adapter_identity("base-a", copy) == identity != "base-a"
    tuned = greedy_replies(model, tokenizer, PROMPTS, adapter="moved", identity=identity, **kwargs)
    assert len(calls) == 4 and tuned != first
    again = greedy_replies(
        model, tokenizer, PROMPTS, adapter="moved", identity=adapter_identity("base-a", copy),
        **kwargs,
    )  # fmt: skip
    assert again == tuned and len(calls) == 4
    with torch.no_grad():  # other weights: another identity, never the cached replies
        next(p for n, p in model.named_parameters() if "lora_B.moved" in n).add_(1.0)
    model.save_pretrained(str(other), selected_adapters=["moved"])
    assert adapter_identity("base-a", other / "moved") != identity
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B.moved" in n).sub_(1.0)


def test_remembered_values_are_keyed_by_everything_they_depend_on(tmp_path: Path) -> None:
    computed = []

    def value(x: float) -> Callable[[], float]:
        return lambda: computed.append(x) or x

    assert remembered(tmp_path, "factuality", ["model-a", "q1"], value(0.5)) == 0.5
    assert remembered(tmp_path, "factuality", ["model-a", "q1"], value(0.9)) == 0.5
    assert remembered(tmp_path, "factuality", ["model-b", "q1"], value(0.7)) == 0.7
    assert remembered(None, "factuality", ["model-a", "q1"], value(0.1)) == 0.1  # no cache
    assert computed == [0.5, 0.7, 0.1]


def test_the_anchor_cycles_through_the_retain_replies(moved) -> None:
    model, tokenizer, examples = moved
    pad = tokenizer.pad_token_id
    anchor = AnchorBatches(
        examples, reference_topk(model, examples, k=16, pad_id=pad), batch_size=4, pad_id=pad
    )
    assert anchor.next_indices() == [0, 1, 2, 3]
    assert anchor.next_indices() == [4, 5, 0, 1]
    assert anchor.nbytes == sum(len(e.response_ids) for e in examples) * (16 * 8 + 16 * 4 + 4)
    kl = anchor.kl(model, torch.device("cpu"))
    assert kl.shape == (4,) and kl.requires_grad and (kl > 0).all()


def _drift(result: RunResult) -> float:
    drift = result.eval.candidate.retain_kl
    assert drift is not None
    return drift.nats_per_reply


def test_a_run_reports_drift_and_the_anchor_keeps_it_down(
    chatty_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """Two runs at a learning rate that moves the model a lot; the anchored one keeps the
    *gate's* retain set (not the prompts it trained on) closer to the reference."""
    measured = tmp_path / "retain-eval.jsonl"
    measured.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    results = {}
    for weight in (0.0, 10.0):
        spec = make_spec(
            tmp_path / str(weight),
            chatty_model_dir,
            pairs_file,
            eval_data=str(pairs_file),
            hyper={"max_steps": 8, "learning_rate": 3e-2},
            anchor={"weight": weight, "max_new_tokens": 12, "batch_size": 8},
            eval={"retain_set": str(measured), "retain_max_new_tokens": 12}
            | {"generate_max_prompts": 3, "kl_max_examples": 2},
        )
        results[weight] = run(spec)
        assert results[weight].status == "succeeded", results[weight].error
    free, anchored = results[0.0], results[10.0]
    drift = free.eval.candidate.retain_kl
    assert drift is not None and drift.num_replies == len(PROMPTS) and drift.nats_per_reply > 0
    generation, task_kl = free.eval.candidate.generation, free.eval.candidate.task_kl
    assert generation is not None and len(generation.replies) == 3
    assert task_kl is not None and task_kl.num_replies == 2  # eval.kl_max_examples
    assert free.steps[0].anchor_kl is None and free.anchor == {}
    assert all(s.anchor_kl is not None and s.anchor_kl >= 0 for s in anchored.steps)
    assert anchored.anchor["replies"] == 63 and anchored.anchor["reference_bytes"] > 0
    assert _drift(anchored) < 0.5 * _drift(free), (_drift(anchored), _drift(free))


def test_the_reference_once_per_base_and_an_adapter_once_per_weights(
    chatty_model_dir: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh's reference evaluation (greedy replies, retain replies, factuality) is the same
    every round, and the incumbent of the second run is the first run's candidate: the second
    run generates and scores factuality for its own candidate only, and reads the rest."""
    generated: list[str | None] = []
    scored: list[str | None] = []
    real_generate, real_factuality = evalcache.generate, evaluate.factuality

    def counting_generate(*a: Any, **k: Any) -> Any:
        generated.append(k["adapter"])
        return real_generate(*a, **k)

    def counting_factuality(*a: Any, **k: Any) -> Any:
        scored.append(k["adapter"])
        return real_factuality(*a, **k)

    monkeypatch.setattr(evalcache, "generate", counting_generate)
    monkeypatch.setattr(evaluate, "factuality", counting_factuality)
    results = []
    for n in (1, 2):
        spec = make_spec(
            tmp_path / str(n),
            chatty_model_dir,
            pairs_file,
            eval_data=str(pairs_file),
            hyper={"max_steps": 2},
            reference_cache=str(tmp_path / "cache" / "reference.sqlite"),
            incumbent_adapter=str(tmp_path / "1" / "out" / "adapter") if n == 2 else None,
            seed=n,  # another candidate (the same seed would train the same weights: a hit)
        )
        results.append(run(spec))
        assert results[-1].status == "succeeded", results[-1].error
        if n == 1:  # the reference's held-out and retain replies, the candidate's replies
            assert generated == [None, "default", None] and scored == ["default", None]
    assert generated[3:] == ["default"] and scored[2:] == ["default"]
    first, second = results
    assert first.eval.reference.factuality == second.eval.reference.factuality
    assert first.eval.reference.generation is not None
    assert second.eval.reference.generation is not None
    assert first.eval.reference.generation.replies == second.eval.reference.generation.replies
    incumbent = second.eval.incumbent
    assert incumbent is not None and incumbent.generation is not None
    assert first.eval.candidate.generation is not None
    assert incumbent.generation.replies == first.eval.candidate.generation.replies
    assert incumbent.factuality == first.eval.candidate.factuality
    assert incumbent.retain_kl == first.eval.candidate.retain_kl
